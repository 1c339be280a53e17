"""Data at any size (issue 15): streamed domains within ``data.cache_bytes``, DataLoader workers, the training
prefetch, translated sets written to disk shard by shard, and the bounded attention-map cache."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daaa import bench
from daaa.config import DataConfig, load_config
from daaa.data import image_folder, labelled_folder, load_tensors
from daaa.data.domain import DomainData, ImageTensors, UnreadableImage, fingerprint
from daaa.data.streaming import (LazyImages, PrefetchingSampler, StepPrefetch, cache_room, load_domains, load_images,
                                 materialize, scan, take)
from daaa.distributed import Context
from daaa.errors import DataError

CPU = Context(0, 1, torch.device("cpu"), None, False)
RNG = np.random.default_rng(7)


def _folder(root: Path, n: int, classes: int = 3, flat: bool = False) -> Path:
    """``n`` images of mixed modes, formats and sizes (RGB/L/RGBA, PNG/JPEG, 12-30 px) in ``classes`` classes."""
    for i in range(n):
        h, w = (int(v) for v in RNG.integers(12, 30, 2))
        arr = RNG.integers(0, 256, (h, w, 4), dtype=np.uint8)
        img = [Image.fromarray(arr[..., :3]), Image.fromarray(arr[..., 0]), Image.fromarray(arr, "RGBA")][i % 3]
        folder = root if flat else root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / (f"{i:03d}.jpg" if i % 3 == 0 else f"{i:03d}.png"))
    return root


def _cfg(**changes) -> DataConfig:
    return DataConfig(load_size=16, image_size=16, num_workers=2, **changes)


# ---------------------------------------------------------------------------------------------- lazy domains
def test_lazy_images_decode_the_same_pixels_as_the_in_memory_domain(tmp_path):
    domain = labelled_folder(_folder(tmp_path / "d", 11))
    eager = load_tensors(domain, 16, 3).images
    lazy = LazyImages(domain, 16, 3, num_workers=2)
    assert lazy.shape == eager.shape and len(lazy) == 11 and lazy.nbytes == eager.nbytes
    assert torch.equal(lazy[:], eager) and torch.equal(lazy[3], eager[3]) and torch.equal(lazy[-1], eager[-1])
    assert torch.equal(lazy[np.int64(2)], eager[2]) and torch.equal(lazy[torch.tensor(4)], eager[4])
    idx = torch.tensor([9, 0, 4, 4])
    assert torch.equal(lazy[idx], eager[idx]) and torch.equal(lazy[[1, 2]], eager[[1, 2]])
    assert torch.equal(lazy[torch.arange(11) % 2 == 0], eager[::2])
    assert torch.equal(materialize(lazy), eager)  # decoded by two DataLoader workers
    got = torch.cat([b for _, b in scan(lazy, 4, rows=torch.tensor([10, 2, 5, 7, 1]))])
    assert torch.equal(got, eager[[10, 2, 5, 7, 1]])
    view = take(lazy, torch.tensor([8, 1, 5]))  # a view stays undecoded, and indexes like the tensor's rows
    assert isinstance(view, LazyImages) and torch.equal(view[1:], eager[[1, 5]])
    assert torch.equal(take(eager, torch.tensor([8, 1])), eager[[8, 1]])
    with pytest.raises(IndexError):
        lazy[torch.tensor([11])]


def test_budget_decides_memory_or_stream(tmp_path):
    s, t = labelled_folder(_folder(tmp_path / "s", 6)), image_folder(_folder(tmp_path / "t", 5, flat=True))
    per_image = 3 * 16 * 16
    assert isinstance(load_images(s, _cfg(), 6 * per_image).images, torch.Tensor)  # fits exactly
    lazy = load_images(s, _cfg(), 6 * per_image - 1)
    assert isinstance(lazy.images, LazyImages) and lazy.labels.tolist() == s.labels and lazy.classes == s.classes
    both = load_domains({"source": s, "target": t}, _cfg(cache_bytes=8 * per_image))  # S fits, then T does not
    assert isinstance(both["source"].images, torch.Tensor) and isinstance(both["target"].images, LazyImages)
    data = DomainData(both["source"], both["target"])
    assert cache_room(_cfg(cache_bytes=8 * per_image), data) == 2 * per_image


def test_budget_options_are_checked():
    from daaa.errors import ConfigError

    for bad in ("data.cache_bytes=-1", "data.num_workers=-2"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]) as e:
            load_config("smoke", [bad])
        assert "\n" not in str(e.value)
    cfg = load_config("smoke", ["data.cache_bytes=0", "data.num_workers=0"])
    assert (cfg.data.cache_bytes, cfg.data.num_workers) == (0, 0)
    from daaa.pipeline import _data_key

    assert _data_key(cfg) == _data_key(load_config("smoke"))  # how data are held changes no stage's result


def test_fingerprint_of_a_streamed_domain_is_its_files(tmp_path):
    root = _folder(tmp_path / "d", 4)
    a = LazyImages(labelled_folder(root), 16, 3)
    same = LazyImages(labelled_folder(root), 16, 3)
    assert fingerprint(a) == fingerprint(same) != fingerprint(LazyImages(labelled_folder(root), 8, 3))
    assert fingerprint(take(a, torch.tensor([0, 1]))) != fingerprint(a)
    path = Path(labelled_folder(root).ids[2])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a changed file is another data set
    assert fingerprint(LazyImages(labelled_folder(root), 16, 3)) != fingerprint(a)
    # images that are not files (array data sets) are hashed by their pixels
    arrays = LazyImages(labelled_folder(root), 16, 3)
    arrays.domain.ids = [f"array[{i}]" for i in range(4)]
    twin = LazyImages(labelled_folder(root), 16, 3)
    twin.domain.ids = [f"other[{i}]" for i in range(4)]
    assert fingerprint(arrays) == fingerprint(twin)


def test_corrupt_image_in_a_worker_is_one_line_or_skipped(tmp_path, caplog):
    root = _folder(tmp_path / "d", 6)
    bad = root / "c1" / "bad.png"
    bad.write_bytes(b"not a png")
    lazy = load_images(labelled_folder(root), _cfg(), 0)
    with pytest.raises(UnreadableImage) as e:
        materialize(lazy.images)
    assert "bad.png" in str(e.value) and "\n" not in str(e.value)  # not DataLoader's worker traceback
    skipped = load_images(labelled_folder(root), _cfg(skip_corrupt=True), 0)
    assert len(skipped) == 6 and str(bad) not in skipped.ids and "skipped 1 corrupt" in caplog.text
    assert torch.equal(materialize(skipped.images), load_tensors(labelled_folder(root), 16, 3, True).images)


def test_step_prefetch_runs_ahead_and_restarts(tmp_path):
    lazy = LazyImages(labelled_folder(_folder(tmp_path / "d", 9)), 16, 3, num_workers=2)
    eager = materialize(lazy)

    def plan(step: int) -> list[torch.Tensor]:
        return [torch.tensor([step % 9, (step * 5) % 9]), torch.tensor([step % 4])]

    pf = StepPrefetch([lazy, eager], plan, end=8, workers=2)
    for step in [0, 1, 2, 5, 6, 0, 7, 9]:  # a jump (resume) or a step past the end: started over / in process
        (r0, p0), (r1, p1) = pf.get(step)
        assert torch.equal(r0, plan(step)[0]) and torch.equal(p0, eager[r0]) and torch.equal(p1, eager[r1])
    pf.close()


# ---------------------------------------------------------------------------------------------- training
def _streamed(data: DomainData, tmp_path: Path, workers: int = 2) -> DomainData:
    """The same data with every training set a LazyImages over PNG files of its pixels."""
    def lazy(images: torch.Tensor, name: str) -> LazyImages:
        folder = tmp_path / name
        folder.mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
        return LazyImages(image_folder(folder), images.shape[-1], images.shape[1], workers)

    def domain(d: ImageTensors, name: str) -> ImageTensors:
        return ImageTensors(d.name, lazy(d.images, name), d.labels, d.ids, d.classes)

    return DomainData(domain(data.source, "S"), domain(data.target, "T"), lazy(data.synthetic_target, "Tf"),
                      lazy(data.synthetic_source, "Sf"), data.target_test)


def _run(trainer, steps: range) -> list[dict]:
    return [trainer.step(s) for s in steps]


@pytest.mark.parametrize("overrides", [[], ["adapt.async_posterior=false", "data.augment=true", "data.load_size=36"]],
                         ids=["paper", "emA-augment"])
def test_prefetched_streamed_training_equals_in_memory(tmp_path, monkeypatch, overrides):
    """DAAA steps on streamed S, T, T_f, S_f (decoded ahead by DataLoader workers and staged) give exactly the
    losses and weights of the in-memory run; no image is decoded in the training process during the steps."""
    cfg = load_config("smoke", ["adapt.confidence_threshold=0.105", *overrides])
    data = bench.synthetic_data(cfg)
    data.source = ImageTensors(data.source.name, data.source.images[:40], data.source.labels[:40],
                               data.source.ids[:40], data.source.classes)
    data.synthetic_target = data.synthetic_target[:40]
    streamed = _streamed(data, tmp_path)
    eager = bench.daaa_trainer(cfg, data, CPU, tmp_path, "eager")
    lazy = bench.daaa_trainer(cfg, streamed, CPU, tmp_path, "lazy")
    assert isinstance(lazy.sampler, PrefetchingSampler) and not isinstance(eager.sampler, PrefetchingSampler)
    import daaa.data.streaming as streaming
    calls = []
    real = streaming.decode_resized
    monkeypatch.setattr(streaming, "decode_resized", lambda *a: (calls.append(a[1]), real(*a))[1])
    steps = range(cfg.adapt.sync_interval + 2)  # through an M_post sync: EM and L_AT active
    want, got = _run(eager, steps), _run(lazy, steps)
    assert got == want
    for k, v in eager.net.state_dict().items():
        assert torch.equal(v, lazy.net.state_dict()[k]), k
    calls.clear()
    lazy.step(len(steps) + 1)  # no M_post sync at this step (whose posterior refresh may decode here): a jump ahead
    assert calls == []  # its images, anchors included, came decoded from the workers
    resumed = bench.daaa_trainer(cfg, streamed, CPU, tmp_path, "resumed")  # a resumed run starts its prefetch late
    resumed.load_state(copy.deepcopy(eager.state()))
    assert _run(resumed, range(len(steps), len(steps) + 2)) == _run(eager, range(len(steps), len(steps) + 2))


def test_prefetch_reads_anchors_only_on_steps_that_compute_L_AT(tmp_path):
    """A beta = 0 row logs L_AT on every adapt.attention_log_interval-th step only: the workers decode the anchors
    of Eq. 5 for those steps and not for the others; with the anchors' maps cached, on none."""
    from daaa.data.streaming import step_rows

    cfg = load_config("smoke", ["adapt.beta=0", "adapt.attention_log_interval=3"])
    data = bench.synthetic_data(cfg)
    streamed = _streamed(data, tmp_path)
    cached = bench.daaa_trainer(cfg, streamed, CPU, tmp_path, "cached")
    assert cached.source_maps is not None and cached.sampler.anchors is None
    cfg.adapt.cache_source_attention = False
    lazy = bench.daaa_trainer(cfg, streamed, CPU, tmp_path, "lazy")
    sampler = lazy.sampler
    assert isinstance(sampler, PrefetchingSampler)
    for step in range(6):
        planned = dict(zip(sampler.names, sampler._plan(step)))
        reads = "all" if step in (2, 5) else None  # steps 3 and 6 (1-based) log L_AT
        assert lazy.computes_attention(step) == (reads is not None)
        want = step_rows(sampler.sampler.batch(step), reads)
        for name, rows in planned.items():
            assert torch.equal(rows, want[name]), (step, name)
    assert not torch.equal(step_rows(sampler.sampler.batch(0), None)["synthetic_source"],
                           step_rows(sampler.sampler.batch(0), "all")["synthetic_source"])


def test_prefetched_streamed_baseline_equals_in_memory(tmp_path):
    """The baseline trainer (DANN here) reads streamed S and T through the same prefetch: identical steps."""
    from daaa.runs import Stage
    from daaa.trainers.baselines import BaselineTrainer

    cfg = load_config("smoke", ["adapt.steps=3"])
    data = bench.synthetic_data(cfg)
    streamed = _streamed(data, tmp_path)

    def trainer(d: DomainData, name: str) -> BaselineTrainer:
        torch.manual_seed(0)
        net = bench._bench_model(cfg, d)
        return BaselineTrainer("dann", cfg, cfg.baseline, d, CPU, Stage(tmp_path, name, {}), net, progress=False)

    eager, lazy = trainer(data, "eager"), trainer(streamed, "lazy")
    assert isinstance(lazy.sampler, PrefetchingSampler) and not isinstance(eager.sampler, PrefetchingSampler)
    torch.manual_seed(1)  # the discriminator's dropout draws from the global RNG
    got = _run(lazy, range(3))
    torch.manual_seed(1)
    assert got == _run(eager, range(3))


def test_source_map_cache_is_bounded_by_the_budget(tmp_path):
    cfg = load_config("smoke", ["adapt.confidence_threshold=0.105"])
    data = bench.synthetic_data(cfg)
    cached = bench.daaa_trainer(cfg, data, CPU, tmp_path, "cached")
    assert cached.source_maps is not None
    small = copy.deepcopy(cfg)
    small.data.cache_bytes = cache_room(cfg.data, data) - cfg.data.cache_bytes + 1000  # images fit, maps do not
    per_step = bench.daaa_trainer(small, data, CPU, tmp_path, "per-step")
    assert per_step.source_maps is None
    for step in range(cfg.adapt.sync_interval + 1):
        a, b = cached.step(step), per_step.step(step)
        assert b["L_AT"] == pytest.approx(a["L_AT"], rel=1e-5) and b["L_AT"] > 0


# ---------------------------------------------------------------------------------------------- translation on disk
def _translate(run_dir: Path, room: int | None, monkeypatch, shard: int = 4, ctx: Context | None = None):
    from test_cyclegan import domains, tiny_cfg
    import daaa.translate as translate

    src, tgt = domains()
    return translate.run_translation(run_dir, tiny_cfg(shard_size=shard), src, tgt, CPU.device, progress=False,
                                     room=room, ctx=ctx), src, tgt


class _ThreadRank(Context):
    """One rank of a 2-process job played by a thread: broadcast and all-gather go through shared slots."""

    def __init__(self, rank: int, shared: dict):
        super().__init__(rank, 2, torch.device("cpu"), None, False)
        self.shared = shared

    def _exchange(self, obj: object) -> list:
        self.shared["slots"][self.rank] = obj
        self.shared["barrier"].wait()
        out = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return out

    def broadcast_object(self, obj):
        return self._exchange(obj)[0]

    def all_gather_object(self, obj):
        return self._exchange(obj)

    def barrier(self):
        self._exchange(None)


def test_ranks_share_out_the_translation_shards(tmp_path, monkeypatch):
    """Under torchrun, rank 0 trains the CycleGAN and every rank translates its shards (k mod 2): the files equal a
    one-process translation's, and each shard was translated once, by its rank."""
    import threading

    import daaa.translate as translate

    one, _, _ = _translate(tmp_path / "one", 0, monkeypatch)
    real, by = translate._translate_shard, []
    monkeypatch.setattr(translate, "_translate_shard", lambda w, side, r, rows: (
        by.append((threading.current_thread().name, side, int(rows[0]))), real(w, side, r, rows)))
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=120)}
    out, errors = {}, []

    def rank(r: int) -> None:
        try:
            out[r] = _translate(tmp_path / "two", 0, monkeypatch, ctx=_ThreadRank(r, shared))[0]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(by) == sorted([(f"rank{(first // 4) % 2}", side, first)
                                 for side, n in (("source", 12), ("target", 10)) for first in range(0, n, 4)])
    for r in (0, 1):
        for name in ("synthetic_target", "synthetic_source", "round_trip_source", "round_trip_target"):
            assert torch.equal(materialize(getattr(out[r], name)), materialize(getattr(one, name))), (r, name)
    assert (tmp_path / "two" / "translate" / "stage.json").is_file()


def test_translation_on_disk_equals_in_memory_and_reads_back(tmp_path, monkeypatch):
    from daaa.translate import load_translation

    kept, src, tgt = _translate(tmp_path / "mem", None, monkeypatch)
    assert (tmp_path / "mem" / "translate" / "translated.pt").is_file()
    disk, _, _ = _translate(tmp_path / "disk", 0, monkeypatch)
    stage = tmp_path / "disk" / "translate"
    assert not (stage / "translated.pt").exists() and isinstance(disk.synthetic_target, LazyImages)
    for name in ("synthetic_target", "synthetic_source", "round_trip_source", "round_trip_target"):
        assert torch.equal(materialize(getattr(disk, name)), getattr(kept, name)), name  # PNG is lossless
    assert sorted(p.name for p in (stage / "shards").iterdir()) == [
        "source-00000.json", "source-00001.json", "source-00002.json", "target-00000.json", "target-00001.json",
        "target-00002.json"]  # 12 source and 10 target images in shards of 4
    json.loads((stage / "manifest.json").read_text())  # written entry by entry, still one JSON document
    in_memory = load_translation(stage, DataConfig(num_workers=2), room=10 ** 9)
    assert torch.equal(in_memory.synthetic_source, kept.synthetic_source)
    streamed = load_translation(stage, DataConfig(num_workers=2), room=0)
    assert isinstance(streamed.synthetic_source, LazyImages) and isinstance(streamed.round_trip_source, LazyImages)
    assert fingerprint(streamed.synthetic_target) == fingerprint(disk.synthetic_target)


def test_translation_resumes_per_shard(tmp_path, monkeypatch):
    import daaa.translate as translate

    reference, _, _ = _translate(tmp_path / "ref", 0, monkeypatch)
    real = translate._translate_shard
    done = []

    def crash_on_the_fourth(w, side, real_set, rows):
        if len(done) == 3:
            raise KeyboardInterrupt  # killed at the fourth shard
        real(w, side, real_set, rows)
        done.append((side, int(rows[0])))

    monkeypatch.setattr(translate, "_translate_shard", crash_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        _translate(tmp_path / "run", 0, monkeypatch)
    stage = tmp_path / "run" / "translate"
    assert not (stage / "stage.json").exists() and len(list((stage / "shards").iterdir())) == 3
    redone = []
    monkeypatch.setattr(translate, "_translate_shard",
                        lambda w, side, r, rows: (redone.append((side, int(rows[0]))), real(w, side, r, rows)))
    (stage / "shards" / "source-00001.json").write_text('{"steps": 5, "first": 4, "count": 4}')  # another CycleGAN's
    resumed, _, _ = _translate(tmp_path / "run", 0, monkeypatch)
    assert redone == [("source", 4), ("target", 0), ("target", 4), ("target", 8)]  # unmarked or stale shards only
    for name in ("synthetic_target", "synthetic_source", "round_trip_target"):
        assert torch.equal(materialize(getattr(resumed, name)), materialize(getattr(reference, name))), name


def test_user_translation_folders_stream_past_the_budget(tmp_path):
    from test_cyclegan import domains
    from daaa.translate import load_translation_folders

    src, tgt = domains()
    for folder, real in ((tmp_path / "tf", src), (tmp_path / "sf", tgt)):
        folder.mkdir()
        for rid, img in zip(real.ids, real.images):
            Image.fromarray(img[0].numpy()).save(folder / (Path(rid).stem + ".png"))
    eager = load_translation_folders(tmp_path / "tf", tmp_path / "sf", src, tgt, 14, 1)
    lazy = load_translation_folders(tmp_path / "tf", tmp_path / "sf", src, tgt, 14, 1, DataConfig(num_workers=1), 0)
    assert isinstance(lazy.synthetic_target, LazyImages)
    assert torch.equal(materialize(lazy.synthetic_target), eager.synthetic_target) and torch.equal(
        eager.synthetic_target, src.images)


# ---------------------------------------------------------------------------------------------- end to end
# shards of 64 images: on 2 processes rank 1 translates shards 1 and 3 of each side
STREAMED = ["--set", "data.cache_bytes=0", "--set", "data.num_workers=1", "--set", "cyclegan.shard_size=64"]


@pytest.mark.slow
def test_streamed_run_equals_in_memory_run_also_on_two_processes(tmp_path):
    """`daaa run` with every set streamed (data.cache_bytes=0: domains, T_f and S_f on disk, maps per step, one
    DataLoader worker per rank) ends with the weights of the in-memory run; so does the same run on 2 processes."""
    from test_distributed import DEMO, DETERMINISTIC, _finish, _ok, _start, _weights

    args = ["run", *DEMO, *DETERMINISTIC, "--set", "adapt.filtering=false"]
    runs = {"memory": (tmp_path / "memory", [], 1), "streamed": (tmp_path / "streamed", STREAMED, 1),
            "streamed-2": (tmp_path / "streamed-2", STREAMED, 2)}
    procs = [_start(args + extra + ["--out", str(out)], tmp_path, n) for out, extra, n in runs.values()]
    for p in procs:
        _ok(_finish(p))
    memory, streamed, two = (out for out, _, _ in runs.values())
    assert (memory / "translate" / "translated.pt").is_file() and not (streamed / "translate" / "translated.pt").exists()
    assert "is streamed from disk" in (streamed / "log.txt").read_text()
    files = sorted(p.relative_to(streamed) for p in (streamed / "translate").glob("synthetic_*/*.png"))
    assert len(files) == 400
    assert all((streamed / f).read_bytes() == (two / f).read_bytes() for f in files)  # ranks 0 and 1 translated
    for stage in ("source", "adapt"):
        w1, w2, w3 = (_weights(d / stage / "model.pt") for d in (memory, streamed, two))
        assert all(torch.equal(w1[k], w2[k]) for k in w1), stage  # same pixels, same batches: the same weights
        assert max(float((w2[k] - w3[k]).abs().max()) for k in w2) <= 1e-4, stage
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (memory, streamed))
    assert m1["daaa"]["target_test_accuracy"] == m2["daaa"]["target_test_accuracy"]


@pytest.mark.slow
def test_streamed_run_resumes_after_kill(tmp_path):
    """kill -9 during the streamed adapt stage (DataLoader workers alive); the re-run resumes from the checkpoint
    and ends with the weights of an uninterrupted streamed run."""
    import signal
    import subprocess
    import time

    from test_distributed import DEMO, DETERMINISTIC, _daaa, _env, _launcher, _ok, _weights

    args = ["run", *DEMO, *DETERMINISTIC, *STREAMED, "--set", "adapt.steps=24", "--set",
            "adapt.checkpoint_interval=2", "--set", "adapt.eval_interval=8"]
    ref, run = tmp_path / "reference", tmp_path / "killed"
    p = subprocess.Popen(_launcher(1) + args + ["--out", str(run)], cwd=tmp_path, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint, deadline = run / "adapt" / "checkpoint.pt", time.monotonic() + 300
    try:
        while not checkpoint.exists():
            assert p.poll() is None and time.monotonic() < deadline, "no adapt checkpoint"
            time.sleep(0.01)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the run, its DataLoader workers with it
        p.wait()
    assert not (run / "adapt" / "stage.json").exists()
    _ok(_daaa(args + ["--out", str(run)], tmp_path))
    _ok(_daaa(args + ["--out", str(ref)], tmp_path))
    assert "adapt: resuming from" in (run / "log.txt").read_text()
    w_ref, w_run = _weights(ref / "adapt" / "model.pt"), _weights(run / "adapt" / "model.pt")
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
