"""Backbones by name, the aligned-layer rule, the self-describing model file and a stage's step count (issue 16).

Unit tests without training: large networks are built on the meta device (shapes only, no memory, no init); the
end-to-end runs with these backbones are in tests/test_predict.py.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn

from daaa.config import ModelConfig, load_config
from daaa.errors import ConfigError, DaaaError
from daaa.models import (Classifier, ResNet50, alignable_layers, build_model, check_arch, describe,
                         load_model_file, model_info, model_key, read_model_file, save_model_file)
from daaa.runs import Stage


def _meta(arch: str, rule="all-but-stem", image_size: int = 32, classes: int = 5) -> nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(arch=arch, aligned_layers=rule), classes, 3, image_size, log=False)


def test_resnet50_all_but_stem_gives_todays_52_layers():
    net = _meta("resnet50")
    layers = net.aligned_layers
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    # every conv but the stem's conv1: 16 bottlenecks x 3 + 4 projection shortcuts, in module order
    assert len(layers) == 52 and layers == [n for n in convs if n != "backbone.conv1"]
    assert "backbone.layer2.0.downsample.0" in layers
    assert _meta("resnet50", "stage-outputs").aligned_layers == [f"backbone.layer{i}" for i in range(1, 5)]
    assert list(ResNet50(3).aligned_layers) == layers  # the class kept for code written against it


def test_digit_cnn_keeps_its_three_conv_layers_under_every_rule():
    for rule in ("all-but-stem", "stage-outputs", ["conv1", "conv2", "conv3"]):
        net = build_model(ModelConfig(arch="digit_cnn", width=4, aligned_layers=rule), 10, 1, 32)
        assert net.aligned_layers == ["conv1", "conv2", "conv3"], rule  # no stem; conv4 is the classifier
    with pytest.raises(ConfigError, match=r"model.aligned_layers: no module 'conv9' in the network \(close: conv4"):
        build_model(ModelConfig(arch="digit_cnn", width=4, aligned_layers=["conv1", "conv9"]), 10, 1, 32)


@pytest.mark.parametrize("arch,stem,count", [("resnet18", "backbone.conv1", 19),
                                             ("efficientnet_b0", "backbone.features.0", 80),
                                             ("mobilenet_v3_small", "backbone.features.0", 51),
                                             ("convnext_tiny", "backbone.features.0", 21),
                                             ("densenet121", "backbone.features.conv0", 119)])
def test_torchvision_backbones_share_the_interface(arch, stem, count):
    net = _meta(arch, classes=7)
    assert isinstance(net, Classifier) and net.fc.out_features == 7
    assert len(net.aligned_layers) == count and not any(n.startswith(stem) for n in net.aligned_layers)
    # the 0.1x backbone learning rate needs the two groups to split every parameter exactly once
    ids = [id(p) for p in net.backbone_parameters()] + [id(p) for p in net.head_parameters()]
    assert sorted(ids) == sorted(id(p) for p in net.parameters()) and len(set(ids)) == len(ids)
    f = net.features(torch.zeros(2, 3, 32, 32, device="meta"))
    assert f.shape == (2, net.fc.in_features) and net.head(f).shape == (2, 7)


def test_a_small_torchvision_network_trains_a_step_on_the_cpu():
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="mobilenet_v3_small"), 3, 3, 32)
    logits = net(torch.randn(4, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (4, 3) and net.fc.weight.grad is not None
    assert all(p.grad is not None for p in net.backbone_parameters() if p.requires_grad)


def test_unknown_names_are_one_line_with_close_matches(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet181' \(close: resnet18"):
        check_arch(load_config("smoke", ["model.arch=resnet181"]).model.arch)
    with pytest.raises(ConfigError, match="model.aligned_layers: 'every-conv' is not one of"):
        load_config("smoke", ["model.aligned_layers=every-conv"])
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ConfigError, match=r"timm/NAME needs the timm package \(pip install 'daaa\[timm\]'\)"):
        check_arch(load_config("smoke", ["model.arch=timm/resnet18"]).model.arch)


def test_a_transformer_is_refused_for_L_AT_and_a_too_small_input_is_one_line():
    vit = _meta("vit_b_16", image_size=224)
    assert vit.aligned_layers == []  # its one conv is the patch embedding: the stem
    with pytest.raises(ConfigError, match=r"vit_b_16 has no conv layer after its stem, so L_AT"):
        alignable_layers(vit)
    assert alignable_layers(_meta("resnet18")) == _meta("resnet18").aligned_layers
    with pytest.raises(ConfigError, match=r"data.image_size: vit_b_16 cannot take 32 px images"):
        _meta("vit_b_16", image_size=32)


def test_pretrained_weights_from_a_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "r18.pth")
    net = build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "r18.pth")), 4, 3, 32)
    assert torch.equal(net.backbone.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    assert net.fc.out_features == 4  # the head is new, for the data set's classes
    # another run's model file: its backbone
    save_model_file(tmp_path / "model.pt", net)
    again = build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "model.pt")), 9, 3, 32)
    assert torch.equal(again.backbone.conv1.weight, ref.conv1.weight)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(DaaaError, match=r"r34.pth does not fit resnet18 \(missing \[\], unexpected \['layer1.2"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "r34.pth")), 4, 3, 32)
    with pytest.raises(ConfigError, match="option model.pretrained: .*nope.pth is not a file"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "nope.pth")), 4, 3, 32)


def test_the_model_file_describes_its_network_in_plain_types(tmp_path):
    cfg = load_config("smoke", ["data.channels=1", "data.mean=[0.1]", "data.std=[0.3]"])
    torch.manual_seed(0)
    net = describe(build_model(cfg.model, 3, 1, 32), model_info(cfg, ["a", "b", "c"], 3))
    save_model_file(tmp_path / "model.pt", net)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)  # nothing but tensors and plain containers
    info = raw["info"]
    assert json.loads(json.dumps(info)) == info
    assert (info["arch"], info["classes"], info["channels"], info["image_size"], info["mean"], info["std"]) == \
        ("digit_cnn", ["a", "b", "c"], 1, 32, [0.1], [0.3])
    assert info["daaa_version"] and info["model"]["width"] == cfg.model.width
    loaded, info2 = load_model_file(tmp_path / "model.pt")  # no config needed
    x = torch.randn(2, 1, 32, 32)
    assert info2 == info and torch.equal(loaded(x), net.eval()(x))
    # daaa 0.1's bare state dict: readable with a description from elsewhere (the run's config.yaml)
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    assert read_model_file(tmp_path / "bare.pt")[1] is None
    assert torch.equal(load_model_file(tmp_path / "bare.pt", info)[0](x), loaded(x))
    with pytest.raises(DaaaError, match="bare.pt: a bare state dict without a description"):
        load_model_file(tmp_path / "bare.pt")


def test_model_key_leaves_the_default_rule_out():
    assert "aligned_layers" not in model_key(ModelConfig())  # run folders made before the option stay valid
    assert model_key(ModelConfig(aligned_layers="stage-outputs"))["aligned_layers"] == "stage-outputs"


def test_a_stage_compares_its_step_count_apart(tmp_path):
    key = {"adapt": {"steps": 4, "lr": 0.1}, "seed": 0}
    done = Stage(tmp_path, "adapt", key, "adapt.steps")
    done.begin()
    done.finish({"accuracy": 0.5})
    more = Stage(tmp_path, "adapt", {"adapt": {"steps": 6, "lr": 0.1}, "seed": 0}, "adapt.steps")
    more.check_compatible()  # extending is allowed ...
    assert more.done() is None and more.finished_steps() == 4  # ... and not done: it resumes
    assert Stage(tmp_path, "adapt", key, "adapt.steps").done() == {"accuracy": 0.5}
    with pytest.raises(DaaaError, match=r"finished 4 steps \(adapt.steps\); 2 would shorten it"):
        Stage(tmp_path, "adapt", {"adapt": {"steps": 2, "lr": 0.1}, "seed": 0}, "adapt.steps").check_compatible()
    with pytest.raises(DaaaError, match=r"incompatible config \(adapt.lr: 0.1 before, 0.2 now\)"):
        Stage(tmp_path, "adapt", {"adapt": {"steps": 6, "lr": 0.2}, "seed": 0}, "adapt.steps").check_compatible()
    with pytest.raises(DaaaError, match="incompatible config"):  # without steps_key the count is part of the key
        Stage(tmp_path, "adapt", {"adapt": {"steps": 6, "lr": 0.1}, "seed": 0}).check_compatible()


# ------------------------------------------------------------------------------ adapt.attention_tap
def _recorded(net: nn.Module, taps, x: torch.Tensor) -> list[torch.Tensor]:
    from daaa.attention import FeatureRecorder

    with FeatureRecorder(net, taps) as rec:
        net(x)
        return rec.features


def test_attention_taps_of_the_digit_cnn():
    """conv: the conv outputs (signed); activation and block: after the ReLU (the digit CNN has no blocks)."""
    from daaa.models import attention_taps

    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="digit_cnn", width=4), 10, 3, 16, log=False)
    x = torch.randn(2, 3, 16, 16)
    conv = _recorded(net, attention_taps(net, "conv"), x)
    assert attention_taps(net, "conv") == ["conv1", "conv2", "conv3"] and (conv[0] < 0).any()
    for tap in ("activation", "block"):
        taps = attention_taps(net, tap)
        assert [t[0] for t in taps] == ["conv1", "conv2", "conv3"]
        got = _recorded(net, taps, x)
        assert all(torch.equal(g, torch.relu(c)) for g, c in zip(got, conv)), tap
    with pytest.raises(ConfigError, match="adapt.attention_tap: 'relu' is not one of conv, activation, block"):
        attention_taps(net, "relu")


def test_attention_taps_of_a_resnet_read_after_batch_norm_and_at_block_outputs():
    from daaa.attention import AttentionAlignmentLoss
    from daaa.models import attention_taps

    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="resnet18"), 4, 3, 32, log=False).eval()
    x = torch.randn(2, 3, 32, 32)
    act = attention_taps(net, "activation")
    assert len(act) == 19 and act[0][0] == "backbone.layer1.0.bn1"
    assert dict(act)["backbone.layer2.0.downsample.1"] is not None  # the projection shortcut's BN
    block = attention_taps(net, "block")
    assert block == [f"backbone.layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    b = net.backbone.layer1[0]
    with torch.no_grad():
        want = torch.relu(b.bn1(b.conv1(net.backbone.maxpool(net.backbone.relu(net.backbone.bn1(
            net.backbone.conv1(x)))))))
        got = _recorded(net, act, x)[0]
    assert torch.allclose(got, want, atol=1e-6)
    net.train()  # L_AT's gradient flows through both readings (torchvision's ReLUs are in place)
    for taps in (act, block):
        feats = _recorded(net, taps, x)
        loss = AttentionAlignmentLoss()([f.detach().flip(0) for f in feats], feats)
        loss.backward()
        assert torch.isfinite(net.backbone.layer1[0].conv1.weight.grad).all()
        net.zero_grad()


def test_no_activation_runs_in_place_so_the_conv_tap_reads_the_convs_own_output():
    """torchvision's VGG rectifies each conv's output in place: the "conv" tap (Eq. 4's F_l) would hold the ReLU's
    values, and L_AT's energy taps could not pass the output on. build_model turns every in-place module off."""
    from daaa.attention import FeatureRecorder
    from daaa.models import attention_taps

    net = build_model(ModelConfig(arch="vgg11", pretrained="none"), 3, 3, 32, log=False)
    assert not any(getattr(m, "inplace", False) for m in net.modules())  # ReLUs and dropouts alike
    with FeatureRecorder(net, attention_taps(net)) as rec:
        net(torch.randn(2, 3, 32, 32))
        assert all(f.min() < 0 for f in rec.features)
    with FeatureRecorder(net, attention_taps(net), energy=True) as rec:
        net(torch.randn(2, 3, 32, 32)).sum().backward()
        assert len(rec.energies) == len(net.aligned_layers)
