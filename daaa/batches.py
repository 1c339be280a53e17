"""Mixed-domain mini-batches of real source S, synthetic target T_f, real target T, synthetic source S_f.

Supplementary Sec. 1 fixes the proportions at 0.35 / 0.15 / 0.35 / 0.15. Pairs are kept together: the T_f rows of
a batch are the translations G_ST(x^S) of its first S rows, and the S_f rows are G_TS(x^T) of its first T rows. The
anchors of Eq. 5's pair terms (x^S, G_TS(x^T)) only go through the frozen source net, so they need not be rows:
every T row has its anchor S_f[target_idx] (:meth:`MixedBatch.anchor_rows`).

Sampling is a pure function of (seed, step): each stream walks through an endless sequence of seeded
permutations, so a resumed run draws exactly the batches of an uninterrupted one, and every DDP rank computes the
same global batch and keeps its own shard of rows (``rank::world``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STREAM_ORDER = ("S", "Tf", "T", "Sf")


def stream_counts(batch_size: int, proportions: list[float], train_data: str) -> dict[str, int]:
    """Rows per stream in a global batch: proportions renormalised over the streams trained on, rounded so the
    counts add up to ``batch_size`` (largest remainder), with paired streams never outnumbering their partner."""
    active = set(train_data.split("+"))
    unknown = active - set(STREAM_ORDER)
    if unknown or len(proportions) != len(STREAM_ORDER) or min(proportions) < 0:
        raise ValueError(f"train_data {train_data!r} and proportions {proportions}: expected streams joined by '+' "
                         f"from {'/'.join(STREAM_ORDER)} and four non-negative proportions")
    weights = {s: (p if s in active else 0.0) for s, p in zip(STREAM_ORDER, proportions)}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"proportions {proportions} give no rows to {train_data}")
    exact = {s: batch_size * w / total for s, w in weights.items()}
    counts = {s: int(v) for s, v in exact.items()}
    for s in sorted(STREAM_ORDER, key=lambda s: exact[s] - counts[s], reverse=True)[: batch_size - sum(counts.values())]:
        counts[s] += 1
    for a, b in (("Tf", "S"), ("Sf", "T")):
        if a in active and b in active and counts[a] > counts[b]:
            counts[a], counts[b] = counts[b], counts[a]
    return counts


class IndexStream:
    """Endless sampling without replacement from ``n`` items: positions [k, k + m) of a chain of permutations."""

    def __init__(self, n: int, seed: int, stream_id: int):
        self.n, self.seed, self.stream_id = n, seed, stream_id
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stream_id * 7_919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def take(self, start: int, count: int) -> torch.Tensor:
        out = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.n)
            chunk = self._permutation(epoch)[offset: offset + count - len(out)]
            out.extend(chunk.tolist())
            pos += len(chunk)
        return torch.tensor(out, dtype=torch.long)


@dataclass
class MixedBatch:
    """Indices of one (local) mixed batch. Rows of the concatenated batch are ordered S | Tf | T | Sf.

    ``source_idx`` index S (labels y^S); ``tf_idx`` index S too: row j of Tf is G_ST(x^S[tf_idx[j]]) and carries its
    label; ``target_idx`` index T; ``sf_idx`` index T: row m of Sf is G_TS(x^T[sf_idx[m]]).
    """

    source_idx: torch.Tensor
    tf_idx: torch.Tensor
    target_idx: torch.Tensor
    sf_idx: torch.Tensor

    @property
    def counts(self) -> dict[str, int]:
        return {"S": len(self.source_idx), "Tf": len(self.tf_idx), "T": len(self.target_idx), "Sf": len(self.sf_idx)}

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for s, n in self.counts.items():
            out[s] = slice(start, start + n)
            start += n
        return out

    @staticmethod
    def _leading_match(real: torch.Tensor, translated: torch.Tensor) -> int:
        """len(translated) when the first rows of ``real`` are the images ``translated`` came from, else 0."""
        n = len(translated)
        return n if n and len(real) >= n and torch.equal(real[:n], translated) else 0

    def paired_source_rows(self) -> int:
        """How many leading S rows are the real counterparts of this batch's Tf rows."""
        return self._leading_match(self.source_idx, self.tf_idx)

    def paired_target_rows(self) -> int:
        """How many leading T rows are the real counterparts of this batch's Sf rows."""
        return self._leading_match(self.target_idx, self.sf_idx)

    def crop_partners(self) -> torch.Tensor:
        """For each row (S | Tf | T | Sf), the row whose crop it takes: a T_f row G_ST(x^S_j) is cropped like the S
        row of x^S_j and an S_f row G_TS(x^T_m) like the T row of x^T_m (the leading S / T rows, as the sampler
        draws them); every other row keeps its own. A pair's two images then show the same part of the picture,
        and the anchors of Eq. 5 for the T_f and S_f rows are those of the S and T rows: the frozen source net
        takes each anchor once (:meth:`daaa.trainers.adapt.DAAATrainer.attention_loss`)."""
        sl = self.slices()
        out = torch.arange(sl["Sf"].stop)
        for rows, real, n in (("Tf", "S", self.paired_source_rows()), ("Sf", "T", self.paired_target_rows())):
            if n:
                out[sl[rows]] = torch.arange(sl[real].start, sl[real].start + n)
        return out

    def anchor_rows(self, target_anchors: str = "all") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs of Eq. 5 as (target_rows, anchor_source_idx, anchor_sf_idx).

        Row ``target_rows[k]`` of the batch goes through the target network; its anchor goes through the frozen
        source network: for the first ``len(anchor_source_idx)`` pairs the real source image S[anchor_source_idx],
        for the rest the synthetic source image S_f[anchor_sf_idx]. In Eq. 5's terms:
        S rows (x^S_i, x^S_i), Tf rows (x^S_j, G_ST(x^S_j)), Sf rows (G_TS(x^T_m), G_TS(x^T_m)), and T rows
        (G_TS(x^T_n), x^T_n).

        Eq. 5's fourth sum runs over the real target images n, so with ``target_anchors="all"`` (the paper's reading)
        every T row is paired with its own translation S_f[target_idx[n]], whether or not that image is a row of the
        batch (anchors are never rows: they only go through the frozen source net), also when S_f is not trained on
        (the ``Tf+T`` rows of Table 2). ``"paired"`` is daaa's earlier reading, kept to measure the difference: only
        the leading T rows whose S_f is in the batch (:meth:`paired_target_rows`) take part.
        """
        if target_anchors not in ("all", "paired"):
            raise ValueError(f"target_anchors must be 'all' or 'paired', got {target_anchors!r}")
        sl = self.slices()
        n_t = len(self.target_idx) if target_anchors == "all" else self.paired_target_rows()
        t0 = sl["T"].start
        target_rows = torch.cat([
            torch.arange(sl["S"].start, sl["Tf"].stop),
            torch.arange(sl["Sf"].start, sl["Sf"].stop),
            torch.arange(t0, t0 + n_t),
        ])
        anchor_source_idx = torch.cat([self.source_idx, self.tf_idx])
        anchor_sf_idx = torch.cat([self.sf_idx, self.target_idx[:n_t]])
        return target_rows, anchor_source_idx, anchor_sf_idx


class MixedBatchSampler:
    """Draws the global mixed batch of a step and returns this rank's shard of it."""

    def __init__(self, n_source: int, n_target: int, batch_size: int, proportions: list[float], train_data: str,
                 seed: int, rank: int = 0, world_size: int = 1):
        if n_source < 1 or n_target < 1 or not 0 <= rank < world_size:
            raise ValueError(f"MixedBatchSampler: n_source={n_source}, n_target={n_target} must be >= 1 and "
                             f"0 <= rank={rank} < world_size={world_size}")
        self.counts = stream_counts(batch_size, proportions, train_data)
        self.rank, self.world_size = rank, world_size
        self.source = IndexStream(n_source, seed, 1)
        self.target = IndexStream(n_target, seed, 2)
        # Tf and Sf only get streams of their own when their partners are not trained on
        self.tf_stream = IndexStream(n_source, seed, 3)
        self.sf_stream = IndexStream(n_target, seed, 4)

    def global_batch(self, step: int) -> MixedBatch:
        c = self.counts
        s = self.source.take(step * c["S"], c["S"])
        t = self.target.take(step * c["T"], c["T"])
        tf = s[: c["Tf"]] if c["S"] >= c["Tf"] and c["S"] else self.tf_stream.take(step * c["Tf"], c["Tf"])
        sf = t[: c["Sf"]] if c["T"] >= c["Sf"] and c["T"] else self.sf_stream.take(step * c["Sf"], c["Sf"])
        return MixedBatch(s, tf, t, sf)

    def batch(self, step: int) -> MixedBatch:
        g = self.global_batch(step)
        if self.world_size == 1:
            return g
        r, w = self.rank, self.world_size
        return MixedBatch(g.source_idx[r::w], g.tf_idx[r::w], g.target_idx[r::w], g.sf_idx[r::w])
