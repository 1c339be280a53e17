"""Probes behind BENCHMARKS.md's "Tried and dropped" (CycleGAN step) and the quiet profile of the DAAA step (issue 18).

    python3 benchmarks/step_probes.py threads B T     # one CycleGAN step, batch B, T intra-op threads
    python3 benchmarks/step_probes.py sharded B K     # the same step as K Python threads of B/K images (1 thread each)
    python3 benchmarks/step_probes.py groupnorm       # batch 32 with group norm (groups = channels) for instance norm
    python3 benchmarks/step_probes.py profile         # torch.profiler of 10 source-only and 10 DAAA bench steps
    python3 benchmarks/step_probes.py gpu_profile     # the same at office31's shapes on CUDA in bf16 (gpu.sh)
    python3 benchmarks/step_probes.py floor [R]       # source-only step, + the anchors' frozen forward, + L_AT, DAAA step
                                                      # (floor, int8, compile, overlap: adapt.anchor_crops=forward)
    python3 benchmarks/step_probes.py int8 [R]        # the anchors' frozen forward in fp32 vs eager int8 quantization
    python3 benchmarks/step_probes.py compile [R]     # a plain step and an L_AT step, eager vs torch.compile
    python3 benchmarks/step_probes.py overlap [R]     # the anchors' frozen forward in a second thread, beside the target's
    python3 benchmarks/step_probes.py opcount         # aten calls per office31-shaped step (the GPU ratio's CPU proxy)

The CycleGAN probes use random images of the ``digits-cpu`` shape and print seconds per step (20 steps after 5 of
warm-up); "two processes" in BENCHMARKS.md is ``threads 16 1`` started twice at once.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from daaa.config import load_config
from daaa.style_gst import build_cyclegan, style_field


def _cyclegan(batch: int):
    cfg = load_config("digits-cpu", [f"cyclegan.batch_size={batch}"])
    torch.manual_seed(0)
    xs, xt = torch.rand(batch, 3, 32, 32) * 2 - 1, torch.rand(batch, 3, 32, 32) * 2 - 1
    return cfg, build_cyclegan(cfg.cyclegan, 3, 0, None, cfg.runtime.channels_last), xs, xt


def _time(step, label: str, repeats: int = 20, ms: bool = False) -> None:
    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - t0) / repeats
    print(f"{label}: {seconds * 1000:.2f} ms per call" if ms else f"{label}: {seconds:.3f} s per step")


def threads(batch: int, n_threads: int) -> None:
    torch.set_num_threads(n_threads)
    _, model, xs, xt = _cyclegan(batch)
    _time(lambda: model.training_step(xs, xt), f"batch {batch}, {n_threads} thread(s)")


def sharded(batch: int, shards: int) -> None:
    """The generator and discriminator halves of CycleGAN.training_step on ``shards`` slices of the batch in parallel
    Python threads (1 intra-op thread each), gradients summed in a fixed order: the same math as one step."""
    cfg, m, xs, xt = _cyclegan(batch)
    n = torch.get_num_threads()
    pool = ThreadPoolExecutor(shards, initializer=lambda: torch.set_num_threads(1))
    list(pool.map(lambda _: time.sleep(0.05), range(shards)))
    torch.set_num_threads(n)  # the workers keep their own setting
    g_params = list(itertools.chain(m.G_ST.parameters(), m.G_TS.parameters()))
    d_params = list(itertools.chain(m.D_T.parameters(), m.D_S.parameters()))

    def gen_half(part):
        rs, rt, donors = part
        fake_t = m.G_ST(rs, m._input(style_field(donors, cfg.cyclegan.style_grid)))
        fake_s = m.G_TS(rt)
        loss = (m.gan_loss(m.D_T(fake_t), True) + m.gan_loss(m.D_S(fake_s), True)
                + F.l1_loss(m.G_TS(fake_t), rs) + F.l1_loss(m.g_st(fake_s, rt), rt))
        return torch.autograd.grad(loss * len(rs) / batch, g_params), fake_t.detach(), fake_s.detach()

    def disc_half(part):
        rs, rt, pt, ps = part
        loss = 0.5 * (m.gan_loss(m.D_T(rt), True) + m.gan_loss(m.D_T(pt), False)
                      + m.gan_loss(m.D_S(rs), True) + m.gan_loss(m.D_S(ps), False))
        return torch.autograd.grad(loss * len(rs) / batch, d_params)

    def step():
        rs, rt = m._input(xs), m._input(xt)
        m._set_d_grad(False)
        out = list(pool.map(gen_half, zip(rs.chunk(shards), rt.chunk(shards), torch.roll(rt, 1, 0).chunk(shards))))
        for i, p in enumerate(g_params):
            p.grad = sum(o[0][i] for o in out)
        m.opt_g.step()
        m._set_d_grad(True)
        pt = m.pool_t.query(torch.cat([o[1] for o in out]))
        ps = m.pool_s.query(torch.cat([o[2] for o in out]))
        grads = list(pool.map(disc_half, zip(rs.chunk(shards), rt.chunk(shards), pt.chunk(shards), ps.chunk(shards))))
        for i, p in enumerate(d_params):
            p.grad = sum(g[i] for g in grads)
        m.opt_d.step()

    _time(step, f"batch {batch} as {shards} threads")


def groupnorm() -> None:
    nn.InstanceNorm2d.forward = lambda self, x: F.group_norm(x, x.shape[1], eps=self.eps)  # same math, other kernel
    _, model, xs, xt = _cyclegan(32)
    _time(lambda: model.training_step(xs, xt), "batch 32, group norm")


# the probes of the frozen forward that Eq. 5 needs with crops (digits-cpu itself reads cached maps since issue 18)
EXACT_ANCHORS = ("adapt.anchor_crops=forward",)


def _trainers(preset: str = "digits-cpu", device: str = "cpu", overrides: tuple[str, ...] = ()):
    """The bench's source-only and DAAA trainers of ``preset`` (default ``digits-cpu``), the DAAA one past its first
    M_post sync (EM active, as in `daaa bench`)."""
    from daaa import bench, distributed

    cfg = load_config(preset, ["runtime.progress=false", f"runtime.device={device}", *overrides])
    ctx = distributed.setup(cfg.runtime)  # as `daaa bench` (cudnn autotuning, TF32, autocast, channels_last)
    data, folder = bench.synthetic_data(cfg, 0), Path(tempfile.mkdtemp())
    source_only = bench.daaa_trainer(cfg, data, ctx, folder, "source", True)
    daaa = bench.daaa_trainer(cfg, data, ctx, folder)
    first = cfg.adapt.sync_interval
    for i in range(5):
        source_only.step(i)
        daaa.step(first + i)
    return cfg, source_only, daaa, first


def _first_batch(cfg, daaa, first: int):
    """The DAAA trainer's batch of step ``first``, its crops and the prepared input rows (S | T_f | T | S_f)."""
    from daaa.data.transforms import prepare, train_crops

    batch = daaa.sampler.batch(first)
    images = daaa._images(batch)
    crops = train_crops(images, cfg.data, cfg.runtime.seed, first)[batch.crop_partners()]
    return batch, crops, prepare(images, cfg.data, train=True, crops=crops, channels_last=cfg.runtime.channels_last)


def _interleaved(runs: dict, rounds: int, base: str) -> None:
    """Times ``runs`` (name -> one call) in interleaved rounds of 5 calls after 5 of warm-up each; prints each one's
    median ms per call and its median ratio to ``base`` (the machine drifts within minutes: only rounds compare)."""
    import statistics

    for fn in runs.values():
        for _ in range(5):
            fn()
    ms: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            ms[name].append((time.perf_counter() - t0) / 5 * 1000)
    for name, v in ms.items():
        ratio = statistics.median(a / b for a, b in zip(v, ms[base]))
        print(f"{name}: {statistics.median(v):.1f} ms per step (median of {rounds}), {ratio:.3f}x {base}")


def _conv_features(m: nn.Module, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The digit CNN's three aligned conv outputs (its ``features`` up to conv3, as the hooks record them)."""
    a = m.conv1(v)
    b = m.conv2(m.act(m.pool(a)))
    return a, b, m.conv3(m.act(m.pool(b)))


def _alignment_step_parts():
    """A DAAA step reduced to what Eq. 5 with crops adds to plain training, on the bench's first DAAA batch: the
    target net (a copy of the bench's, Adam) on the 64 rows with cross-entropy, and the frozen source net's maps of
    44 anchor rows to align them with (rows 0-43 of the batch, then 20 of them again: every row is paired)."""
    import copy

    from daaa.attention import attention_map, pair_distances

    cfg, _, daaa, first = _trainers(overrides=EXACT_ANCHORS)
    x = _first_batch(cfg, daaa, first)[2]
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(0))
    anchors, pair_of = x[:44].clone(), torch.cat([torch.arange(44), torch.arange(20)])
    net, frozen = copy.deepcopy(daaa.net).train(), daaa.source_net.eval()
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)

    def features(m: nn.Module, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b, c = _conv_features(m, v)
        return a, b, c, m.head(m.act(m.pool(c)).flatten(1))

    @torch.no_grad()
    def anchor_maps(v: torch.Tensor) -> list[torch.Tensor]:
        return [attention_map(f) for f in features(frozen, v)[:3]]

    def plain_loss(v: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(v), y, reduction="sum") / len(v)

    def alignment_loss(outputs: tuple[torch.Tensor, ...], source_maps: list[torch.Tensor]) -> torch.Tensor:
        target_maps = [attention_map(f) for f in outputs[:3]]
        at = sum(pair_distances(s[pair_of], t).sum() for s, t in zip(source_maps, target_maps))
        return (F.cross_entropy(outputs[3], y, reduction="sum") + at) / len(outputs[3])

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return x, anchors, features, net, anchor_maps, plain_loss, alignment_loss, update


def compiled(rounds: int = 10) -> None:
    """The plain step and the L_AT step of :func:`_alignment_step_parts`, eager and under ``torch.compile`` (inductor,
    static shapes; compile time printed): would fusing the maps into the convolutions' neighbours shrink L_AT's cost?"""
    x, anchors, features, net, anchor_maps, plain_loss, alignment_loss, update = _alignment_step_parts()

    def at_loss(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return alignment_loss(features(net, v), anchor_maps(a))

    t0 = time.perf_counter()
    plain_c, at_c = torch.compile(plain_loss, dynamic=False), torch.compile(at_loss, dynamic=False)
    update(plain_c(x))
    update(at_c(x, anchors))
    print(f"compile time (both, first calls): {time.perf_counter() - t0:.1f} s")
    _interleaved({"eager plain step": lambda: update(plain_loss(x)),
                  "eager L_AT step": lambda: update(at_loss(x, anchors)),
                  "compiled plain step": lambda: update(plain_c(x)),
                  "compiled L_AT step": lambda: update(at_c(x, anchors))}, rounds, "eager plain step")


def overlap(rounds: int = 10) -> None:
    """The L_AT step of :func:`_alignment_step_parts` with the frozen forward on the anchors run in a second Python
    thread (1 intra-op thread) while the target net's forward runs in the main thread at 1 or 2 intra-op threads,
    against the same step in sequence (2 threads): do the two cores do more in parallel than within each op?
    Each thread sets its own intra-op thread count before its work (torch's setting is per thread, but a thread's
    first torch call can inherit another's), and the counts are printed from inside the work."""
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(1)
    x, anchors, features, net, anchor_maps, plain_loss, alignment_loss, update = _alignment_step_parts()

    def in_worker(v: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        torch.set_num_threads(1)
        return anchor_maps(v), torch.get_num_threads()

    seen: dict[str, int] = {}

    def side_by_side(main_threads: int) -> None:
        pending = pool.submit(in_worker, anchors)
        torch.set_num_threads(main_threads)
        seen[f"main thread (asked {main_threads})"] = torch.get_num_threads()
        outputs = features(net, x)
        torch.set_num_threads(threads)
        maps, seen["worker"] = pending.result()
        update(alignment_loss(outputs, maps))

    _interleaved({"plain step": lambda: update(plain_loss(x)),
                  "L_AT step, in sequence": lambda: update(alignment_loss(features(net, x), anchor_maps(anchors))),
                  "L_AT step, anchors beside (main 1 thread)": lambda: side_by_side(1),
                  f"L_AT step, anchors beside (main {threads} threads)": lambda: side_by_side(threads)},
                 rounds, "plain step")
    print("intra-op threads seen inside the work:", seen)
    with torch.no_grad():
        for n in (threads, 1):
            torch.set_num_threads(n)
            _time(lambda: features(net, x), f"{n} thread(s): the target net's forward on the 64 rows", 30, ms=True)
            _time(lambda: anchor_maps(anchors), f"{n} thread(s): the anchors' frozen forward and maps", 30, ms=True)
    torch.set_num_threads(threads)


def profile() -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, source_only, daaa, first = _trainers()
    for name, trainer, start in (("source_only", source_only, 10), ("daaa", daaa, first + 10)):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(10):
                trainer.step(start + i)
        print(f"===== {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=40))


def gpu_profile() -> None:
    """The office31 shapes (ResNet-50, 224 px crops, bf16, channels_last) on CUDA: the host-device syncs of one
    source-only and one DAAA step (``torch.cuda.set_sync_debug_mode``: each one drains the launch queue), wall time
    of 10 steps of each (each, and the median), and the kernels' busy time per step over 10 more (a step much longer
    than its kernels is launch-bound)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, source_only, daaa, first = _trainers("office31", "cuda", ("model.pretrained=none", "runtime.precision=bf16",
                                                                 "runtime.channels_last=true"))
    runs = (("source_only", source_only, 10), ("daaa", daaa, first + 10))
    for name, trainer, start in runs:  # host-device syncs per step: each drains the launch queue (one step each)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.step(start - 1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        print(f"===== {name}: {len(syncs)} host-device syncs in one step")
    walls: dict[str, list[float]] = {}
    for name, trainer, start in runs:  # timed before any profiling: CUPTI, once started, may slow later launches
        walls[name] = []  # each step on its own (a step already waits for its losses' values): a stall shows as one
        for i in range(10):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.step(start + i)
            torch.cuda.synchronize()
            walls[name].append(time.perf_counter() - t0)
    for name, trainer, start in runs:
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(10):
                trainer.step(start + 10 + i)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 10 / 1e6
        wall = sorted(walls[name])[len(walls[name]) // 2]
        print(f"===== {name}: {wall * 1e3:.1f} ms per step (wall, median), kernels busy {busy * 1e3:.1f} ms per step; "
              f"steps: {' '.join(f'{w * 1e3:.0f}' for w in walls[name])} ms")
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=50))


def floor(rounds: int = 15) -> None:
    """How far the DAAA step is from what Eq. 5 cannot avoid with crops: the frozen source net's forward on the
    anchors, and the target net's maps of every row with their backward. Times a source-only step, the same step plus
    that forward on one DAAA batch's anchors (their maps included), the same again with L_AT against those anchors
    added to its loss (the target maps of its 64 rows, forward and backward), and the DAAA step, in interleaved
    rounds of 5 steps; prints the medians and the median ratios to the source-only step."""
    from daaa.attention import FeatureRecorder

    cfg, source_only, daaa, first = _trainers(overrides=EXACT_ANCHORS)
    batch, crops, x = _first_batch(cfg, daaa, first)
    rows, src_idx, sf_idx = batch.anchor_rows(cfg.adapt.target_anchors)
    step = {"source_only": 10, "daaa": first + 10}

    def plain() -> None:
        source_only.step(step["source_only"])
        step["source_only"] += 1

    def plus_anchors() -> None:
        plain()
        with torch.no_grad():
            daaa._anchor_maps(batch, crops, x, rows, src_idx, sf_idx)

    def plus_alignment() -> None:
        # L_AT's own work on top: the target net's maps of the 64 rows (forward and backward) against the anchors
        cross_entropy = source_only.classification_loss

        def with_alignment(b, logits):
            return cross_entropy(b, logits) + daaa.attention_loss(batch, crops, rec.energies if rec.energy
                                                                     else rec.features, x)

        with FeatureRecorder(source_only.net, daaa.layers, energy=daaa.energy_taps) as rec:
            source_only.classification_loss = with_alignment
            try:
                plain()
            finally:
                del source_only.classification_loss

    def full() -> None:
        daaa.step(step["daaa"])
        step["daaa"] += 1

    runs = {"source-only step": plain, "+ the anchors' frozen forward": plus_anchors,
            "+ L_AT against them (target maps, forward and backward)": plus_alignment, "DAAA step": full}
    _interleaved(runs, rounds, "source-only step")


def int8(rounds: int = 3) -> None:
    """The frozen source net's forward to its last aligned layer on one DAAA step's 44 anchor rows, fp32 in the
    trainer's layout against PyTorch's eager int8 quantization (x86 qconfig, per-channel weights, calibrated on the
    batch), alternated in rounds of 50 calls; then the int8 maps' relative L2 distance to the fp32 maps per layer."""
    import copy
    import warnings

    import torch.ao.quantization as tq

    from daaa.attention import attention_map

    cfg, _, daaa, first = _trainers(overrides=EXACT_ANCHORS)
    x = _first_batch(cfg, daaa, first)[2][:44]
    net = daaa.source_net.eval()

    class Quantized(nn.Module):
        def __init__(self, m: nn.Module):
            super().__init__()
            self.quant, self.m, self.dequant = tq.QuantStub(), m, tq.DeQuantStub()

        def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.dequant(f) for f in _conv_features(self.m, self.quant(v)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        q = Quantized(copy.deepcopy(net).to(memory_format=torch.contiguous_format)).eval()
        q.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(q, inplace=True)
        with torch.no_grad():
            q(x.contiguous())
        tq.convert(q, inplace=True)
    runs = {"fp32 (trainer's layout)": lambda: _conv_features(net, x), "int8": lambda: q(x.contiguous())}
    with torch.no_grad():
        for r in range(rounds):
            for name, fn in runs.items():
                _time(fn, f"round {r}: {name}", repeats=50, ms=True)
        for layer, (f, g) in enumerate(zip(runs["fp32 (trainer's layout)"](), runs["int8"]()), 1):
            a, b = attention_map(f), attention_map(g)
            print(f"conv{layer} map: int8 off fp32 by {float((a - b).norm() / a.norm()):.2%} (relative L2)")


def opcount(steps: int = 3) -> None:
    """The operations a step issues at the office31 preset's network (ResNet-50, batch 32; 32-px crops so that it
    runs on a CPU): aten calls per source-only and per DAAA step, counted with torch.profiler. At batch 32 on a GPU
    both steps are launch-bound (BENCHMARKS.md, tenth session), so the count's ratio predicts the GPU's cost ratio:
    it gave 1.385 where the H200 measured 1.43. With ``runtime.cuda_graphs`` the frozen forward on the anchors and
    its maps are one graph launch; the proxy counts them as one call. Then the operations the DAAA step adds beyond
    that forward, by name (most are metadata: views, selects; kernels are mul, add_, vector norms, copies)."""
    import collections

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg, source_only, daaa, first = _trainers("office31", "cpu", ("model.pretrained=none", "data.image_size=32",
                                                                  "data.load_size=40", "runtime.channels_last=true"))

    def count(fn) -> collections.Counter:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                fn(i)
        return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))

    plain = count(lambda i: source_only.step(20 + i))
    full = count(lambda i: daaa.step(first + 20 + i))
    x = _first_batch(cfg, daaa, first + 20)[2]
    rows = len(daaa.sampler.batch(first + 20).anchor_rows(cfg.adapt.target_anchors)[0])
    frozen = count(lambda i: daaa._source_maps_of(x[:rows], rows))
    n_plain, n_full, n_frozen = (sum(c.values()) / steps for c in (plain, full, frozen))
    print(f"aten calls per step: source-only {n_plain:.0f}, DAAA {n_full:.0f} ({n_full / n_plain:.3f}x), of which the "
          f"frozen forward on {rows} anchors and their maps {n_frozen:.0f}")
    print(f"proxy of the GPU cost ratio, that forward as one graph launch: {(n_full - n_frozen + 1) / n_plain:.3f}")
    extra = full.copy()
    extra.subtract(plain)
    extra.subtract(frozen)
    for name, n in extra.most_common(15):
        print(f"  {name:36s} +{n / steps:6.1f} per step")


if __name__ == "__main__":
    mode, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
    {"threads": threads, "sharded": sharded, "groupnorm": groupnorm, "profile": profile, "gpu_profile": gpu_profile,
     "floor": floor, "int8": int8, "compile": compiled, "overlap": overlap, "opcount": opcount}[mode](*args)
