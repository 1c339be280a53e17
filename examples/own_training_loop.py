"""Deep adversarial attention alignment written as your own PyTorch loop, from daaa's pieces only.

    python examples/own_training_loop.py            # the embedded MNIST -> MNIST-M demo pair, minutes on 2 cores
    python examples/own_training_loop.py --quick    # a few steps of each stage: checks that it runs

The three steps of the paper (Kang et al., ECCV 2018), each with the piece that does it:

1. Sec. 3.1, adversarial data pairing: a CycleGAN (:class:`daaa.cyclegan.CycleGAN`, Eq. 1-3) pairs every source
   image with a synthetic target image T_f = G_ST(x^S) and every target image with a synthetic source image
   S_f = G_TS(x^T).
2. A source network trained on S and then frozen: the guide of the attention alignment.
3. Sec. 3.4, Eq. 12: the target network (initialised from the source network) trains on mini-batches
   S | T_f | T | S_f with L = L_CE(S, T_f) + L_EM(T, S_f) + beta * L_AT, where L_EM (:func:`daaa.em_loss`, Eq. 11)
   is the cross-entropy against M_post's posteriors (:class:`daaa.PosteriorNetwork`, synced every N steps; p_t by
   :func:`daaa.confidence_mask`) and L_AT (:class:`daaa.AttentionAlignmentLoss`, Eq. 4-5) the distance between the
   attention maps of each pair, recorded by :class:`daaa.FeatureRecorder`.

``daaa run`` / ``daaa demo`` do the same with everything around it (augmentation, checkpoints and resuming, data
larger than memory, the ablation rows, reports); this file shows the method alone. Any ``nn.Module`` works as the
network: pass the names of its conv layers (``daaa.models.aligned_layers(net)`` picks them as the paper does).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from daaa import AttentionAlignmentLoss, FeatureRecorder, PosteriorNetwork, confidence_mask, em_loss
from daaa.config import CycleGANConfig, DataConfig
from daaa.cyclegan import CycleGAN
from daaa.data import load_domain_tensors
from daaa.models import DigitCNN

# rows of a 64-image mini-batch: 0.35 / 0.15 / 0.35 / 0.15 (Supplementary Sec. 1)
N_S, N_TF, N_T, N_SF = 22, 10, 22, 10


def load(role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The demo pair's images in [-1, 1] (N, 3, 32, 32) and their labels (None for the unlabelled target)."""
    data = load_domain_tensors("demo", role, DataConfig())
    return data.images.float() / 127.5 - 1.0, data.labels


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = net.training
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(b).argmax(1) for b in x.split(500)])
    net.train(was_training)
    return float((pred == y).float().mean())


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` (a no-grad translation or posterior) over ``x`` in batches of 256."""
    return torch.cat([fn(b) for b in x.split(256)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cyclegan-steps", type=int, default=600)
    ap.add_argument("--source-steps", type=int, default=600)
    ap.add_argument("--adapt-steps", type=int, default=1600)
    ap.add_argument("--sync-interval", type=int, default=400, help="N: M_post follows the target net every N steps")
    ap.add_argument("--beta", type=float, default=1.0, help="the weight of L_AT in Eq. 12")
    ap.add_argument("--quick", action="store_true", help="5 steps per stage on 256 images per set (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.cyclegan_steps = args.source_steps = args.adapt_steps = 5
        args.sync_interval = 2
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    t0 = time.time()

    xs, ys = load("source")
    xt, _ = load("target")
    xt_test, yt_test = load("target_test")
    if args.quick:
        xs, ys, xt, xt_test, yt_test = xs[:256], ys[:256], xt[:256], xt_test[:256], yt_test[:256]

    # 1. Adversarial data pairing (Sec. 3.1): a small CycleGAN, then T_f = G_ST(S) and S_f = G_TS(T)
    cyclegan = CycleGAN(CycleGANConfig(ngf=16, ndf=16, n_blocks=2, lambda_identity=0.0, lambda_cycle=1.0, lr=4e-4,
                                       steps=args.cyclegan_steps, decay_start=args.cyclegan_steps // 2),
                        channels=3, seed=0)
    for step in range(args.cyclegan_steps):
        cyclegan.training_step(xs[torch.randint(len(xs), (16,), generator=gen)],
                               xt[torch.randint(len(xt), (16,), generator=gen)])
    x_tf = batched(cyclegan.translate_st, xs)  # row i is the pair of xs[i]
    x_sf = batched(cyclegan.translate_ts, xt)  # row j is the pair of xt[j]
    print(f"CycleGAN: {args.cyclegan_steps} steps ({time.time() - t0:.0f} s)")

    # 2. The source network, trained on S and then frozen
    source_net = DigitCNN(width=32)
    opt = torch.optim.Adam(source_net.parameters(), 1e-3)
    for step in range(args.source_steps):
        i = torch.randint(len(xs), (64,), generator=gen)
        loss = F.cross_entropy(source_net(xs[i]), ys[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    source_net.eval().requires_grad_(False)
    print(f"source only: target test accuracy {accuracy(source_net, xt_test, yt_test):.1%}")

    # 3. The target network with Eq. 12
    target_net = DigitCNN(width=32)
    target_net.load_state_dict(source_net.state_dict())
    layers = list(target_net.aligned_layers)  # conv1, conv2, conv3: every conv layer before the classifier
    align = AttentionAlignmentLoss()  # Eq. 4 maps, Eq. 5's L2 distance of each pair, summed
    posterior_net = PosteriorNetwork(target_net, sync_interval=args.sync_interval)  # M_post, modification A
    posteriors = batched(posterior_net, xt)  # p(z | x^T) of every target image: they change only at a sync
    opt = torch.optim.Adam(target_net.parameters(), 1e-3)  # constant lr: modification C restarts nothing
    # which anchor (a row of the frozen net's input [S rows | S_f of the T rows]) each batch row is aligned with:
    # S rows x^S_i and T_f rows G_ST(x^S_j) with x^S; T rows x^T_n and S_f rows G_TS(x^T_m) with G_TS(x^T)
    anchor_of_row = torch.cat([torch.arange(N_S), torch.arange(N_TF), N_S + torch.arange(N_T), N_S + torch.arange(N_SF)])
    for step in range(args.adapt_steps):
        if posterior_net.due(step):
            posterior_net.sync(target_net, step)
            posteriors = batched(posterior_net, xt)
        s = torch.randint(len(xs), (N_S,), generator=gen)
        t = torch.randint(len(xt), (N_T,), generator=gen)
        # pairs stay together: the T_f rows translate the first S rows, the S_f rows the first T rows
        batch = torch.cat([xs[s], x_tf[s[:N_TF]], xt[t], x_sf[t[:N_SF]]])
        with FeatureRecorder(source_net, layers) as anchors, torch.no_grad():
            source_net(torch.cat([xs[s], x_sf[t]]))
            anchor_features = [f[anchor_of_row] for f in anchors.features]
        with FeatureRecorder(target_net, layers) as rows:  # hooks only for this forward
            logits = target_net(batch)
            loss_at = align(anchor_features, rows.features)  # Eq. 5
        loss_ce = F.cross_entropy(logits[:N_S + N_TF], torch.cat([ys[s], ys[s[:N_TF]]]), reduction="sum")
        # Eq. 11: an S_f row takes its real target image's posterior (p(z | G_TS(x^T)) = p(z | x^T), Sec. 3.3)
        posterior = posteriors[t]
        keep = confidence_mask(posterior, posterior_net.threshold(0.95, 1.0))  # p_t = 1 before the first sync
        em_rows = torch.arange(N_T + N_SF) % N_T  # T rows, then S_f rows (the first T rows' translations)
        loss_em = em_loss(logits[N_S + N_TF:], posterior[em_rows], keep[em_rows])
        loss = (loss_ce + loss_em + args.beta * loss_at) / len(batch)  # Eq. 12 (sums, divided by the batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % max(args.adapt_steps // 4, 1) == 0:
            print(f"step {step + 1}: L_CE {loss_ce.item() / (N_S + N_TF):.3f}  L_EM {loss_em.item() / (N_T + N_SF):.3f}"
                  f"  L_AT {loss_at.item() / len(batch):.3f}  kept {int(keep.sum())}/{N_T}"
                  f"  target test accuracy {accuracy(target_net, xt_test, yt_test):.1%}")
    print(f"DAAA: target test accuracy {accuracy(target_net, xt_test, yt_test):.1%} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
