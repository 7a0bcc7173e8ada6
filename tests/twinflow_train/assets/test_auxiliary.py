import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import twinflow_train.assets.auxiliary as aux
from twinflow_train.assets.auxiliary import (
    EVAL_FEATURES, WEIGHTS, CacheCorruptError, DigitsConvNet, DigitsMLPClassifier, DigitsReward, cache_entry,
    cache_root, classifier_accuracy, codec_key, entry_record, eval_key, get_codec, get_eval_net,
    get_reward_classifier, random_shift, record_path, reward_key, train_or_load_file,
)
from twinflow_train.models.codecs import reconstruction_mse
from twinflow_train.config import load_config
from twinflow_train.data.digits import NULL_LABEL, load_digits_split

ROOT = Path(__file__).resolve().parents[3]
TINY = ["codec.steps=20", "aux.reward_steps=20", "aux.eval_steps=20"]


def tiny_cfg(cache: Path, *extra: str):
    return load_config(None, [*TINY, f"aux.cache_dir={cache}", *extra])


@pytest.fixture
def counted(monkeypatch):
    """Count the real training calls behind the cache."""
    calls: list[str] = []
    real_ae, real_clf = aux.fit_autoencoder, aux.fit_classifier

    def fit_ae(*a, **k):
        calls.append("codec")
        return real_ae(*a, **k)

    def fit_clf(*a, **k):
        calls.append(k["desc"])
        return real_clf(*a, **k)

    monkeypatch.setattr(aux, "fit_autoencoder", fit_ae)
    monkeypatch.setattr(aux, "fit_classifier", fit_clf)
    return calls


# --------------------------------------------------------------------------- locations


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINFLOW_LAB_CACHE", str(tmp_path / "env"))
    assert cache_root(load_config(None, [f"aux.cache_dir={tmp_path / 'cfg'}"])) == tmp_path / "cfg"
    assert cache_root(load_config()) == tmp_path / "env"
    monkeypatch.delenv("TWINFLOW_LAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(load_config()) == tmp_path / "home" / ".cache" / "twinflow-lab"


def test_cache_entry_hash(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    a = cache_entry(cfg, kind="codec", key={"x": 1})
    assert a == cache_entry(cfg, kind="codec", key={"x": 1}) and a.parent == tmp_path
    assert a.name.startswith("codec-")
    assert a != cache_entry(cfg, kind="codec", key={"x": 2})
    assert a.name.split("-")[1] != cache_entry(cfg, kind="reward", key={"x": 1}).name.split("-")[1]
    monkeypatch.setitem(aux.FORMAT_VERSIONS, "codec", aux.FORMAT_VERSIONS["codec"] + 1)
    assert a != cache_entry(cfg, kind="codec", key={"x": 1})  # a new format never reuses old entries
    with pytest.raises(ValueError, match="unknown cache kind 'vae'"):
        cache_entry(cfg, kind="vae", key={})  # type: ignore[arg-type]
    assert not a.exists()  # a location only; nothing is created


# --------------------------------------------------------------------------- train_or_load_file


def test_train_or_load_file_builds_once_and_records(tmp_path):
    target = tmp_path / "entry" / "blob.bin"
    calls = []

    def make(tmp: Path):
        calls.append(tmp)
        assert tmp != target and tmp.parent == target.parent
        tmp.write_bytes(b"weights")
        return {"accuracy": 0.5}

    assert train_or_load_file(target, make, key={"k": 1}) == target
    assert train_or_load_file(target, make, key={"k": 1}) == target
    assert len(calls) == 1 and target.read_bytes() == b"weights"
    rec = entry_record(target)
    assert rec["key"] == {"k": 1} and rec["info"] == {"accuracy": 0.5} and rec["bytes"] == 7
    assert sorted(p.name for p in target.parent.iterdir()) == ["blob.bin", "blob.bin.done.json", "blob.bin.lock"]


def test_failed_build_leaves_nothing_and_is_retried(tmp_path):
    target = tmp_path / "blob.bin"

    def broken(tmp: Path):
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train_or_load_file(target, broken)
    assert not target.exists() and not record_path(target).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin.lock"]  # no temp file left behind
    with pytest.raises(RuntimeError, match="wrote nothing"):
        train_or_load_file(target, lambda tmp: None)
    train_or_load_file(target, lambda tmp: tmp.write_bytes(b"ok") and None)
    assert target.read_bytes() == b"ok"


def test_payload_without_record_is_rebuilt_not_loaded(tmp_path):
    target = tmp_path / "blob.bin"
    target.write_bytes(b"left by a writer that died before its record")
    train_or_load_file(target, lambda tmp: tmp.write_bytes(b"fresh") and None)
    assert target.read_bytes() == b"fresh"


def test_corrupt_payload_is_set_aside_and_rebuilt_not_loaded(tmp_path, capsys):
    target = tmp_path / "blob.bin"
    train_or_load_file(target, lambda tmp: tmp.write_bytes(b"abcdef") and None)
    target.write_bytes(b"abcdeX")  # same size, different content
    train_or_load_file(target, lambda tmp: tmp.write_bytes(b"rebuilt") and None)
    assert target.read_bytes() == b"rebuilt"
    err = capsys.readouterr().err
    assert str(target) in err and "does not match its record" in err and "rebuilding" in err
    (aside,) = tmp_path.glob("blob.bin.corrupt-*")  # kept as evidence, with its record
    assert aside.read_bytes() == b"abcdeX" and len(list(tmp_path.glob("blob.bin.done.json.corrupt-*"))) == 1
    record_path(target).write_text("{not json")
    with pytest.raises(CacheCorruptError, match="unreadable"):
        entry_record(target)
    train_or_load_file(target, lambda tmp: tmp.write_bytes(b"again") and None)
    assert target.read_bytes() == b"again" and entry_record(target)["bytes"] == 5


WORKER = r"""
import hashlib, os, sys, time
from pathlib import Path
barrier, n, target, counter, cache = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
from twinflow_train.assets import auxiliary
from twinflow_train.config import load_config


def together(name):
    # all n processes reach this point before any goes on, so their requests overlap
    (barrier / f"{name}-{os.getpid()}").touch()
    deadline = time.time() + 120
    while len(list(barrier.glob(f"{name}-*"))) < n:
        if time.time() > deadline:
            sys.exit(f"barrier {name} timed out")
        time.sleep(0.01)


def make(tmp):
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # hold the lock long enough for the others to arrive
    tmp.write_bytes(b"built-by-%d" % os.getpid())
    return {"builder": os.getpid()}


together("file")
path = auxiliary.train_or_load_file(target, make)
print("file", path.read_bytes().decode(), flush=True)
print("marker", flush=True, file=sys.stderr)
together("codec")
codec = auxiliary.get_codec(load_config(None, ["codec.steps=30", f"aux.cache_dir={cache}"]))
blob = b"".join(v.numpy().tobytes() for v in codec.state_dict().values())
print("codec", os.getpid(), hashlib.sha256(blob).hexdigest())
"""


@pytest.mark.distributed
def test_concurrent_requests_build_once(tmp_path):
    """Two processes ask for the same entries at the same moment: one builds, the other waits and loads."""
    n = 2
    target, counter, cache, barrier = tmp_path / "entry" / "blob.bin", tmp_path / "builds.txt", tmp_path / "cache", \
        tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-c", WORKER, str(barrier), str(n), str(target), str(counter), str(cache)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
        file_err, codec_err = err.split("marker\n")
        outs.append((lines, file_err, codec_err))

    # the generic helper: one build, every process reads its result
    builders = counter.read_text().split()
    assert len(builders) == 1
    assert {o[0]["file"] for o in outs} == {f"built-by-{builders[0]}"}
    assert entry_record(target)["info"] == {"builder": int(builders[0])}
    assert sum("waiting for another process" in o[1] for o in outs) == n - 1

    # get_codec on top of it: one training, identical weights everywhere
    pids, digests = zip(*(o[0]["codec"].split() for o in outs))
    assert len(set(digests)) == 1
    entries = [p for p in cache.iterdir() if p.name.startswith("codec-")]
    assert len(entries) == 1
    assert str(entry_record(entries[0] / WEIGHTS)["pid"]) in pids
    assert sum("waiting for another process" in o[2] for o in outs) == n - 1


# --------------------------------------------------------------------------- reuse vs retrain


def _weights(cfg, kind, key_fn) -> Path:
    return cache_entry(cfg, kind=kind, key=key_fn(cfg)) / WEIGHTS


def test_codec_is_reused_for_the_same_config_and_retrained_for_a_new_one(tmp_path, counted):
    cfg = tiny_cfg(tmp_path)
    first = get_codec(cfg)
    path = _weights(cfg, "codec", codec_key)
    stamp = (path.stat().st_mtime_ns, path.stat().st_ino)
    assert counted == ["codec"]

    again = get_codec(cfg)
    # settings the codec does not depend on do not retrain it either
    unrelated = get_codec(tiny_cfg(tmp_path, "run.seed=7", "aux.reward_steps=33", "teacher.steps=5", "codec.path=/x"))
    assert counted == ["codec"]
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp
    for other in (again, unrelated):
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))

    # every codec field is in the key (the whole section is hashed); these cover the kinds of change
    changes = ["codec.steps=21", "codec.seed=3", "codec.latent_channels=2", "data.split_seed=1"]
    for change in changes:
        get_codec(tiny_cfg(tmp_path, change))
    assert counted == ["codec"] * (1 + len(changes))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("codec-")]) == 1 + len(changes)
    assert get_codec(tiny_cfg(tmp_path, "codec.latent_channels=2")).latent_shape == (2, 4, 4)


def test_reward_and_eval_nets_retrain_only_on_their_own_settings(tmp_path, counted):
    cfg = tiny_cfg(tmp_path)
    get_reward_classifier(cfg)
    get_eval_net(cfg)
    assert counted == ["reward classifier", "evaluation net"]
    get_reward_classifier(tiny_cfg(tmp_path, "aux.eval_steps=25", "codec.steps=5"))
    get_eval_net(tiny_cfg(tmp_path, "aux.reward_seed=22", "codec.steps=5"))
    assert counted == ["reward classifier", "evaluation net"]
    get_reward_classifier(tiny_cfg(tmp_path, "aux.reward_seed=22"))
    get_reward_classifier(tiny_cfg(tmp_path, "aux.reward_steps=21"))
    get_eval_net(tiny_cfg(tmp_path, "aux.eval_seed=32"))
    get_eval_net(tiny_cfg(tmp_path, "aux.eval_steps=21"))
    get_eval_net(tiny_cfg(tmp_path, "data.split_seed=4"))
    assert counted == ["reward classifier", "evaluation net", "reward classifier", "reward classifier",
                       "evaluation net", "evaluation net", "evaluation net"]


def test_corrupt_cached_weights_are_rebuilt_not_loaded(tmp_path, counted):
    cfg = tiny_cfg(tmp_path)
    get_reward_classifier(cfg)
    path = _weights(cfg, "reward", reward_key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=str(path)):
        entry_record(path)
    get_reward_classifier(cfg)  # set aside and rebuilt, not loaded
    assert counted == ["reward classifier", "reward classifier"]
    entry_record(path)  # verifies again
    record_path(path).unlink()  # as if the writer died before its record: rebuilt, not loaded
    get_reward_classifier(cfg)
    assert counted == ["reward classifier", "reward classifier", "reward classifier"]
    assert json.loads(record_path(path).read_text())["key"] == reward_key(cfg)


# --------------------------------------------------------------------------- reward and evaluation nets


@pytest.fixture(scope="module")
def small_nets(tmp_path_factory):
    cfg = load_config(None, ["aux.reward_steps=200", "aux.eval_steps=200",
                             f"aux.cache_dir={tmp_path_factory.mktemp('cache')}"])
    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    return get_reward_classifier(cfg), get_eval_net(cfg), split


def test_reward_is_the_log_probability_of_the_prompt(small_nets):
    clf, _, split = small_nets
    reward = DigitsReward(clf)
    x = split.val_images[:6]
    per_class = torch.stack([reward(x, {"labels": torch.full((6,), c)}) for c in range(10)], dim=1)
    assert per_class.shape == (6, 10) and (per_class <= 0).all()
    assert torch.allclose(per_class.exp().sum(1), torch.ones(6), atol=1e-5)
    # the prompted class of a real digit is usually the most likely one
    assert (per_class.argmax(1) == split.val_labels[:6]).float().mean() >= 0.5


def test_reward_gradient_is_finite_nonzero_and_ascends(small_nets):
    clf, _, split = small_nets
    reward = DigitsReward(clf)
    gen = torch.Generator().manual_seed(0)
    # imperfect digits: real ones with noise, prompted with a class they do not show
    x = (split.val_images[:32] + 0.3 * torch.randn(32, 1, 8, 8, generator=gen)).requires_grad_(True)
    prompts = {"labels": (split.val_labels[:32] + 1) % 10}
    r = reward(x, prompts)
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all()
    assert (g.flatten(1).norm(dim=1) > 0).all()
    assert not any(p.requires_grad for p in reward.parameters())
    step = 0.05 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with torch.no_grad():
        assert (reward(x + step, prompts) > r).float().mean() > 0.9


def test_reward_rejects_bad_prompts(small_nets):
    reward = DigitsReward(small_nets[0])
    x = torch.zeros(3, 1, 8, 8)
    with pytest.raises(ValueError, match="null prompt"):
        reward(x, {"labels": torch.tensor([0, 1, NULL_LABEL])})
    with pytest.raises(ValueError, match="shape"):
        reward(x, {"labels": torch.tensor([0, 1])})
    with pytest.raises(KeyError, match="labels"):
        reward(x, {"text": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        reward(torch.zeros(3, 64), {"labels": torch.tensor([0, 1, 2])})


def test_eval_net_is_an_independent_feature_network(small_nets):
    clf, net, split = small_nets
    assert isinstance(clf, DigitsMLPClassifier) and isinstance(net, DigitsConvNet)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in clf.modules())
    x = split.val_images[:16]
    f = net.features(x)
    assert f.shape == (16, EVAL_FEATURES) and net.logits(x).shape == (16, 10)
    assert torch.equal(f, net.features(x))  # eval mode, no randomness
    assert classifier_accuracy(net.logits, split.val_images, split.val_labels) > 0.8


def test_random_shift_moves_by_at_most_one_pixel_with_background_fill():
    x = -torch.ones(200, 1, 8, 8)
    x[:, 0, 3, 4] = 1.0
    y = random_shift(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and (y == 1.0).flatten(1).sum(1).eq(1).all()
    pos = (y[:, 0] == 1.0).nonzero()[:, 1:]
    assert ((pos - torch.tensor([3, 4])).abs() <= 1).all()
    assert len({tuple(p.tolist()) for p in pos}) == 9  # all nine offsets occur


@pytest.mark.slow
def test_default_auxiliaries_meet_their_quality_bars(tmp_path):
    """The three auxiliaries at the default config, through the cache, as the trainer gets them."""
    cfg = load_config(None, [f"aux.cache_dir={tmp_path}"])
    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    codec, clf, net = get_codec(cfg), get_reward_classifier(cfg), get_eval_net(cfg)
    for m in (codec, clf, net):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert reconstruction_mse(codec, split.val_images) < 0.01
    reward_acc = classifier_accuracy(clf, split.val_images, split.val_labels)
    eval_acc = classifier_accuracy(net.logits, split.val_images, split.val_labels)
    assert reward_acc > 0.9 and eval_acc > 0.9, (reward_acc, eval_acc)
    assert entry_record(_weights(cfg, "reward", reward_key))["info"]["val_accuracy"] == pytest.approx(reward_acc)
    assert entry_record(_weights(cfg, "evalnet", eval_key))["info"]["val_accuracy"] == pytest.approx(eval_acc)
