"""The CUDA code paths, end to end: autocast in bf16 and fp16 (with the gradient scaler), channels_last, checkpoints
written on the GPU and resumed there, and a GPU-trained run predicted on a machine without one. Skipped without a
CUDA GPU (CI has none); ``bash benchmarks/gpu.sh`` runs them on a lent one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from daaa import cli
from daaa.run_figures import read_history

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu.sh)")


def _run(out: Path, precision: str) -> int:
    return cli.main(["run", "--source", "demo", "--target", "demo", "--target-test", "demo", "--out", str(out),
                     "--preset", "smoke", "--quiet", "--set", "runtime.device=cuda",
                     "--set", f"runtime.precision={precision}", "--set", "runtime.channels_last=true"])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_run_on_cuda_and_resume(tmp_path: Path, precision: str) -> None:
    from daaa.models import read_model_file

    run = tmp_path / "run"
    assert _run(run, precision) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for row in ("source_only", "daaa"):
        assert 0.0 <= metrics[row]["target_test_accuracy"] <= 1.0
    history = read_history(run / "adapt" / "history.jsonl")
    assert history and all(math.isfinite(h[k]) for h in history for k in ("L_CE", "L_EM", "L_AT")
                           if h.get(k) is not None)
    assert any(h.get("L_AT") for h in history)  # the attention term was computed on the GPU
    weights = read_model_file(run / "adapt" / "model.pt")[0]
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and torch.isfinite(v).all()
               for v in weights.values() if v.is_floating_point())  # fp32 master weights, readable without a GPU

    # an unfinished adapt stage resumes from its last checkpoint (optimiser and scaler state loaded onto the GPU)
    (run / "adapt" / "stage.json").unlink()
    (run / "metrics.json").unlink()
    assert _run(run, precision) == 0
    assert 0.0 <= json.loads((run / "metrics.json").read_text())["daaa"]["target_test_accuracy"] <= 1.0


def test_gpu_trained_run_predicts_alike_on_cpu_and_cuda(tmp_path: Path) -> None:
    import daaa
    from daaa.config import DataConfig
    from daaa.data.demo import demo_pair, export_domain

    run = tmp_path / "run"
    assert _run(run, "fp32") == 0
    images = export_domain(demo_pair(DataConfig())["target_test"].subset(range(40)), tmp_path / "images")
    on_gpu = daaa.predict(run, images, top_k=3, device="cuda", progress=False)
    on_cpu = daaa.predict(run, images, top_k=3, device="cpu", progress=False)
    assert [r["path"] for r in on_gpu] == [r["path"] for r in on_cpu]
    for g, c in zip(on_gpu, on_cpu):
        assert abs(float(g["probability"]) - float(c["probability"])) < 2e-3, (g, c)


def test_bench_stages_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--preset", "smoke", "--device", "cuda", "--steps", "2", "--repeats", "1",
                     "--warmup", "1", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["gpu"] == torch.cuda.get_device_name(0)
    assert all(v > 0 for v in result["images_per_second"].values())
    assert all(v > 0 for k, v in result["peak_memory_mib"].items() if k != "data_loading")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_source_forward_gives_the_eager_values(tmp_path: Path, precision: str) -> None:
    """runtime.cuda_graphs: the anchors' frozen forward replayed as a CUDA graph gives L_AT as the eager forward does,
    step after step (batches of a varying number of anchors fill the captured input's first rows)."""
    import dataclasses

    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context

    cfg = load_config("smoke", ["data.augment=true", "adapt.cache_source_attention=false", "model.arch=resnet18",
                                "model.pretrained=none", "data.image_size=32", "data.load_size=36",
                                f"runtime.precision={precision}"])
    data = bench.synthetic_data(cfg)
    amp = {"fp32": None, "bf16": torch.bfloat16}[precision]
    eager = bench.daaa_trainer(cfg, data, Context(0, 1, torch.device("cuda"), amp, True), tmp_path / "a")
    graphed = bench.daaa_trainer(cfg, data, Context(0, 1, torch.device("cuda"), amp, True, cuda_graphs=True),
                                 tmp_path / "b")
    graphed.net.load_state_dict(eager.net.state_dict())
    graphed.source_net.load_state_dict(eager.source_net.state_dict())
    for step in range(5):
        batch = eager.sampler.batch(step)
        if step == 3:  # fewer pairs than the captured rows
            batch = dataclasses.replace(batch, target_idx=batch.target_idx[:1], sf_idx=batch.sf_idx[:1])
        a, b = eager.losses(batch, step)["L_AT"], graphed.losses(batch, step)["L_AT"]
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert graphed._graphed is not None and eager._graphed is None


def test_a_forward_that_cannot_be_captured_runs_eagerly(tmp_path: Path, caplog) -> None:
    """A source network that reads a value back to Python in its forward cannot be a CUDA graph: one warning, then
    the eager forward (the run goes on)."""
    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context

    cfg = load_config("smoke", ["data.augment=true", "adapt.cache_source_attention=false"])
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg),
                                 Context(0, 1, torch.device("cuda"), None, False, cuda_graphs=True), tmp_path)
    forward = trainer.source_net.forward
    trainer.source_net.forward = lambda x: forward(x) if float(x.sum()) == float(x.sum()) else None
    with caplog.at_level("WARNING", logger="daaa"):
        for step in range(2):
            assert torch.isfinite(trainer.losses(trainer.sampler.batch(step), step)["L_AT"])
    assert trainer._graphed is False
    assert sum("cannot be captured" in r.getMessage() for r in caplog.records) == 1
