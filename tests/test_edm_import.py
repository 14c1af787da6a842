"""EDM network pickles: the allow-listed loader (EDM_FORMAT §1.8, §1.9) and the converter to the
project's EDMPrecond (§2, §8) — fixture parity with EDM's own outputs, round trips through the test
writer (tests/edm_writer.py, §6.1), hostile pickles refused with nothing they ask for happening, and
the converter's refusals."""
from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_writer import (CANARY_ENV, CANARY_MODULE, canary_src, edm_tree_from_tensors, fake_persistence_modules,
                        fake_reconstruct, make_edm_pickle, pickle_from_precond, random_edm_tensors,
                        write_edm_pickle)
from sims.errors import MissingFileError, UnsafePickleError, WeightsError
from sims.training.edm_import import (LICENCE_NOTE, convert_edm_network, edm_tensor_shapes, export_edm_tensors,
                                      import_edm_tensors)
from sims.training.edm_pickle import (LEGACY_MAGIC, ContainerStub, PersistentStub, SafeEDMUnpickler, describe,
                                      flatten, load_edm_pickle, safe_load)

FIXTURES = Path(__file__).parent / "fixtures" / "edm"

SONG = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
            resample_filter=[1, 1])
# Backbone kwargs (as EDMPrecond passes them to the model, EDM_FORMAT §1.3) for the writer's pickles.
CONFIGS = {
    "ddpmpp8_cond_aug9": ("SongUNet", dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=10,
                                           model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                           augment_dim=9, dropout=0.13, **SONG)),
    "ddpmpp32_uncond_aug0": ("SongUNet", dict(img_resolution=32, in_channels=1, out_channels=1, label_dim=0,
                                              model_channels=16, channel_mult=[1, 1, 2], num_blocks=2,
                                              attn_resolutions=[16], dropout=0.05, channel_mult_emb=2, **SONG)),
    "adm8_uncond_aug9": ("DhariwalUNet", dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=0,
                                              model_channels=32, channel_mult=[1, 2], num_blocks=1,
                                              attn_resolutions=[8, 4], augment_dim=9, dropout=0.1)),
    "adm32_cond_aug0": ("DhariwalUNet", dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=5,
                                             model_channels=32, channel_mult=[1, 2, 2], num_blocks=1,
                                             attn_resolutions=[8], dropout=0.1)),
}


# --------------------------------------------------------------------------------------------------
# The "nothing happened" guard: a canary file, an environment variable, a sys.modules entry, and
# builtins.exec / eval / compile raising while a load runs.
# --------------------------------------------------------------------------------------------------

class Guard:
    def __init__(self, tmp_path: Path, monkeypatch):
        self.canary = tmp_path / "canary_ran"
        self.src = canary_src(str(self.canary))
        self.monkeypatch = monkeypatch
        self.calls: list = []
        monkeypatch.delenv(CANARY_ENV, raising=False)
        sys.modules.pop(CANARY_MODULE, None)

    @contextlib.contextmanager
    def loading(self):
        def forbid(name):
            def refuse(*args, **kwargs):
                self.calls.append(name)
                raise AssertionError(f"builtins.{name} called during a safe EDM load")
            return refuse

        with self.monkeypatch.context() as m:
            for name in ("exec", "eval", "compile"):
                m.setattr(builtins, name, forbid(name))
            yield

    def assert_nothing_happened(self):
        assert not self.canary.exists(), "a hostile payload or module_src ran (canary file written)"
        assert CANARY_ENV not in os.environ, "a hostile payload or module_src ran (environment variable set)"
        assert CANARY_MODULE not in sys.modules, "a hostile payload or module_src ran (sys.modules entry)"
        assert self.calls == [], f"exec/eval/compile were called: {self.calls}"
        assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules

    def load(self, path):
        with self.loading():
            return load_edm_pickle(path)

    def load_bytes(self, raw: bytes):
        with self.loading():
            return safe_load(io.BytesIO(raw))


@pytest.fixture
def guard(tmp_path, monkeypatch):
    g = Guard(tmp_path, monkeypatch)
    yield g
    g.assert_nothing_happened()


def _write(tmp_path, name, cls, kwargs, **kw):
    path = tmp_path / f"{name}.pkl"
    tensors = make_edm_pickle(path, cls, kwargs, **kw)
    return path, tensors


# --------------------------------------------------------------------------------------------------
# Shipped fixtures: made with EDM's own EDMPrecond (random weights), module_src replaced by a canary
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backbone, arch", [("ddpmpp_small16", "SongUNet", "ddpmpp"),
                                                  ("adm_small16", "DhariwalUNet", "adm")])
def test_fixture_parity(guard, name, backbone, arch):
    snap = guard.load(FIXTURES / f"{name}.pkl")
    assert (snap.precond, snap.backbone) == ("EDMPrecond", backbone)
    assert list(snap.tensors) == list(edm_tensor_shapes(backbone, snap.backbone_kwargs))  # names and order
    imported = convert_edm_network(snap)
    assert imported.network["arch"] == arch and imported.data_shape == [3, 16, 16]
    assert imported.info["licence"] == LICENCE_NOTE and imported.info["sha256"] == snap.sha256
    assert hashlib.sha256((FIXTURES / f"{name}.pkl").read_bytes()).hexdigest() == snap.sha256
    json.dumps(imported.info, allow_nan=False)  # JSON-able as it is
    ref = np.load(FIXTURES / f"{name}.io.npz")
    labels = torch.from_numpy(ref["labels"]) if ref["labels"].size else None
    assert imported.label_dim == (0 if labels is None else labels.shape[1])
    with torch.no_grad():
        D = imported.module(torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"]), labels)
    D_ref = torch.from_numpy(ref["D"])
    err = (D - D_ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, D_ref.abs().max().item()), f"{name}: max |D - D_EDM| = {err:.3g}"


def test_fixture_kwargs_recovered(guard):
    snap = guard.load(FIXTURES / "ddpmpp_small16.pkl")
    assert snap.precond_kwargs == dict(
        img_resolution=16, img_channels=3, label_dim=0, model_type="SongUNet", embedding_type="positional",
        encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
        model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9, dropout=0.13)
    assert snap.precond_attrs["sigma_data"] == 0.5 and snap.precond_attrs["sigma_max"] == float("inf")
    assert snap.backbone_kwargs["in_channels"] == 3 and snap.loss_fn is None and snap.augment_pipe is None
    assert len(snap.tensors) == 147 and all(t.dtype == torch.float32 for t in snap.tensors.values())
    block = snap.tree.children["model"].children["enc"].children["8x8_block0"]
    assert snap.tree.children["model"].children["enc"].class_name == "ModuleDict"
    assert block.class_name == "UNetBlock" and block.init_kwargs["attention"] is True
    assert isinstance(block.init_kwargs["init_attn"]["init_weight"], float)  # was a NumPy float64
    assert set(block.children) == {"norm0", "conv0", "affine", "norm1", "conv1", "skip", "norm2", "qkv", "proj"}


# --------------------------------------------------------------------------------------------------
# Writer pickles: other resolutions, (un)conditional, augment_dim 0 / 9, protocols 2 / 4 / 5
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_writer_round_trip(guard, tmp_path, config, protocol):
    cls, kwargs = CONFIGS[config]
    path, tensors = _write(tmp_path, config, cls, kwargs, protocol=protocol, module_src=guard.src,
                           with_augment_pipe=kwargs.get("augment_dim", 0) > 0, seed=protocol)
    raw = path.read_bytes()
    globals_named = {a for op, a, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    if protocol == 2:
        assert "_codecs encode" in globals_named and "torch.storage _load_from_bytes" in globals_named
    snap = guard.load(path)
    flat = snap.tensors
    assert list(flat) == list(tensors)
    for name, t in tensors.items():
        assert flat[name].dtype == t.dtype and torch.equal(flat[name], t), name  # bit-for-bit
    assert (snap.precond, snap.backbone) == ("EDMPrecond", cls)
    assert snap.backbone_kwargs == kwargs and type(snap.backbone_kwargs["dropout"]) is float  # was np.float64
    assert snap.precond_kwargs["model_type"] == cls and snap.precond_kwargs["img_channels"] == kwargs["in_channels"]
    assert snap.precond_attrs["sigma_data"] == 0.5
    assert (snap.loss_fn, snap.loss_kwargs) == ("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))
    if kwargs.get("augment_dim"):
        assert snap.augment_pipe == "AugmentPipe" and snap.augment_kwargs["p"] == 0.12
    else:
        assert snap.augment_pipe is None and snap.augment_kwargs is None
    assert snap.dataset_kwargs["class_name"] == "training.dataset.ImageFolderDataset"
    tree = snap.tree.children["model"]
    assert tree.class_name == cls and tree.init_kwargs == kwargs
    assert {c.class_name for c in tree.children["enc"].children.values()} <= {"UNetBlock", "Conv2d"}
    if protocol == 4:  # the strict import into the project network (once per configuration)
        imported = convert_edm_network(snap)
        assert imported.network["augment_dim"] == kwargs.get("augment_dim", 0)
        assert imported.label_dim == kwargs["label_dim"]
        assert imported.data_shape == [kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"]]
        assert imported.info["dropped_buffers"] == sum(n.endswith("resample_filter") for n in tensors)
        # export ∘ import is the identity on EDM tensors (names, order, bits)
        back = export_edm_tensors(imported.module.state_dict())
        assert list(back) == list(tensors)
        assert all(torch.equal(back[n], tensors[n]) for n in tensors)
        x = torch.randn(2, *imported.data_shape)
        labels = torch.eye(imported.label_dim)[:2] if imported.label_dim else None
        with torch.no_grad():
            assert torch.isfinite(imported.module(x, torch.tensor([0.1, 10.0]), labels)).all()


@pytest.mark.parametrize("arch, backbone", [("ddpmpp", "SongUNet"), ("adm", "DhariwalUNet")])
def test_project_network_round_trip(guard, tmp_path, arch, backbone):
    """project EDMPrecond → export → EDM pickle → safe load → import: the same network, bit for bit."""
    from sims.config import NetworkConfig
    from sims.diffusion import EDMPrecond
    from sims.networks import build_backbone

    network = dict(arch=arch, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                   dropout=0.0, augment_dim=9, channels_per_head=64)
    torch.manual_seed(3)
    src = EDMPrecond(build_backbone(NetworkConfig(**network), 8, 2, 4), sigma_data=0.5, label_dim=4).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kwargs = dict(img_resolution=8, in_channels=2, out_channels=2, label_dim=4, model_channels=32,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.0,
                  **(SONG if backbone == "SongUNet" else {}))
    path = tmp_path / "net.pkl"
    pickle_from_precond(path, src, backbone, kwargs, module_src=guard.src)
    imported = convert_edm_network(guard.load(path))
    cfg_src, cfg_new = NetworkConfig(**network), NetworkConfig(**imported.network)
    assert all(getattr(cfg_src, k) == getattr(cfg_new, k) for k in imported.network)  # every field agrees
    sd_src, sd_new = src.state_dict(), imported.module.state_dict()
    assert list(sd_src) == list(sd_new) and all(torch.equal(sd_src[k], sd_new[k]) for k in sd_src)
    # import ∘ export is the identity on project state dicts
    again = import_edm_tensors(export_edm_tensors(sd_src))
    assert list(again) == list(sd_src) and all(torch.equal(again[k], sd_src[k]) for k in sd_src)
    x, sigma, labels = torch.randn(3, 2, 8, 8), torch.tensor([0.01, 1.0, 50.0]), torch.eye(4)[:3]
    with torch.no_grad():
        assert torch.equal(src(x, sigma, labels), imported.module(x, sigma, labels))


def test_fp16_snapshot_cast_to_fp32(guard, tmp_path):
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    tensors = random_edm_tensors(cls, kwargs, seed=5, dtype=torch.float16)
    path, _ = _write(tmp_path, "fp16", cls, kwargs, tensors=tensors, module_src=guard.src)
    snap = guard.load(path)
    assert all(t.dtype == torch.float16 for t in snap.tensors.values())
    imported = convert_edm_network(snap, build=False)
    assert all(t.dtype == torch.float32 for t in imported.state_dict.values())
    name = "backbone.map_layer0.weight"
    assert torch.equal(imported.state_dict[name], tensors["model.map_layer0.weight"].float())
    assert imported.info["source_dtypes"] == ["torch.float16"]


def test_missing_kwargs_use_edm_defaults(guard, tmp_path):
    """EDM's train.py does not pass num_blocks / attn_resolutions / channel_mult_emb: defaults apply,
    checked against the tensors like every other value."""
    kwargs = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2, 2, 2],
                  **SONG)
    path, _ = _write(tmp_path, "defaults", "SongUNet", kwargs, module_src=guard.src)
    imported = convert_edm_network(guard.load(path), build=False)
    assert (imported.network["num_blocks"], imported.network["attn_resolutions"],
            imported.network["channel_mult_emb"], imported.network["dropout"]) == (4, [16], 4, 0.1)


# --------------------------------------------------------------------------------------------------
# Hostile pickles: refused, nothing they ask for happens
# --------------------------------------------------------------------------------------------------

def _ema(value_ops: bytes) -> bytes:
    """Protocol-2 pickle of {'ema': <value>} around raw opcodes."""
    return b"\x80\x02}X\x03\x00\x00\x00ema" + value_ops + b"s."


def _call(module: str, name: str, args: tuple) -> bytes:
    """Opcodes for GLOBAL module.name applied (REDUCE) to ``args``."""
    body = pickle.dumps(args, protocol=2)
    assert body[:2] == b"\x80\x02" and body[-1:] == b"."
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n" + body[2:-1] + b"R"


def _hostile_globals(canary: Path):
    touch = f"touch {canary}"
    set_env = f"__import__('os').environ.__setitem__({CANARY_ENV!r}, '1')"
    return {
        "os.system": _call("os", "system", (touch,)),
        "posix.system": _call("posix", "system", (touch,)),
        "builtins.eval": _call("builtins", "eval", (set_env,)),
        "__builtin__.exec": _call("__builtin__", "exec", (set_env,)),
        "builtins.getattr": _call("builtins", "getattr", (1, "real")),
        "subprocess.Popen": _call("subprocess", "Popen", (["touch", str(canary)],)),
        "subprocess.check_call": _call("subprocess", "check_call", (["touch", str(canary)],)),
        "torch.load": _call("torch", "load", (str(canary),)),
        "numpy.load": _call("numpy", "load", (str(canary),)),
        "copyreg._reconstructor": b"ccopyreg\n_reconstructor\n(csubprocess\nPopen\nc__builtin__\nobject\nNtR",
        "torch_utils.persistence._src_to_module": _call("torch_utils.persistence", "_src_to_module", (set_env,)),
        "dnnlib.util.construct_class_by_name": _call("dnnlib.util", "construct_class_by_name", ("os.system",)),
        "torch._utils._rebuild_tensor": _call("torch._utils", "_rebuild_tensor", (None, 0, (1,), (1,))),
        "nn.Linear via NEWOBJ": b"ctorch.nn.modules.linear\nLinear\n)\x81",
    }


def test_hostile_payload_is_real(tmp_path):
    """Positive control: plain pickle.loads does run the os.system payload (so the canary works)."""
    canary = tmp_path / "canary_ran"
    pickle.loads(_ema(_hostile_globals(canary)["os.system"]))
    assert canary.exists()


@pytest.mark.parametrize("what", sorted(_hostile_globals(Path("/x"))))
def test_hostile_globals_refused(guard, what):
    raw = _ema(_hostile_globals(guard.canary)[what])
    with pytest.raises(UnsafePickleError, match="is not allowed") as info:
        guard.load_bytes(raw)
    assert "\n" not in str(info.value)


class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _typed_storage(t: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return t.storage()


def _tensor_via(storage_obj, hooks=None, size=(4,)):
    return _Reduce(torch._utils._rebuild_tensor_v2, storage_obj, 0, size, (1,), False,
                   hooks if hooks is not None else collections.OrderedDict())


def _dumps(obj, protocol=4) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pickle.dumps({"ema": obj}, protocol=protocol)


def test_rebuild_tensor_with_hooks_refused(guard):
    hooked = _tensor_via(_typed_storage(torch.zeros(4)), collections.OrderedDict(h=collections.OrderedDict))
    with pytest.raises(UnsafePickleError, match="backward hooks"):
        guard.load_bytes(_dumps(hooked))
    param = _Reduce(torch._utils._rebuild_parameter, torch.zeros(3), False, collections.OrderedDict(h=1))
    with pytest.raises(UnsafePickleError, match="backward hooks"):
        guard.load_bytes(_dumps(param))
    # the same tensor without hooks loads
    assert torch.equal(guard.load_bytes(_dumps(_tensor_via(_typed_storage(torch.arange(4.0)))))["ema"],
                       torch.arange(4.0))


def _legacy_save(obj) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _legacy_blob(numel: int, data: bytes, token: str = "FloatStorage", count=None) -> bytes:
    """A legacy torch.save storage blob written by hand (EDM_FORMAT §1.5) with a chosen header."""
    f = io.BytesIO()
    for obj in (LEGACY_MAGIC, 1001, dict(protocol_version=1001, little_endian=True,
                                         type_sizes=dict(short=2, int=4, long=8))):
        pickle.dump(obj, f, protocol=2)
    marker = object()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", getattr(torch, token), "0", "cpu", numel, None) if obj is marker else None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P(f, protocol=2).dump(marker)
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", numel if count is None else count) + data)
    return f.getvalue()


def _blob_tensor(blob: bytes, size=(4,)):
    return _tensor_via(_Reduce(torch.storage._load_from_bytes, blob), size=size)


class _Evil:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def test_nested_blob_with_malicious_reduce_refused(guard):
    blob = _legacy_save(_Evil(guard.canary))
    with pytest.raises(UnsafePickleError, match="storage blob: global posix.system is not allowed"):
        guard.load_bytes(_dumps(_blob_tensor(blob)))


@pytest.mark.parametrize("payload", ["dict", "tensor", "int"])
def test_nested_blob_not_a_storage_refused(guard, payload):
    obj = {"dict": {"a": 1}, "tensor": torch.zeros(4), "int": 7}[payload]
    with pytest.raises(UnsafePickleError, match="storage blob"):
        guard.load_bytes(_dumps(_blob_tensor(_legacy_save(obj))))


def test_blob_decoding_to_non_storage_refused_after_torch_load(guard, monkeypatch):
    """Defence in depth: even if the header were fine, torch.load's result must be a storage."""
    blob = _legacy_blob(4, np.arange(4, dtype="<f4").tobytes())
    assert torch.equal(guard.load_bytes(_dumps(_blob_tensor(blob)))["ema"], torch.arange(4.0))  # valid by hand
    monkeypatch.setattr(torch, "load", lambda *a, **k: {"not": "a storage"})
    with pytest.raises(UnsafePickleError, match="decoded to dict, not a storage"):
        guard.load_bytes(_dumps(_blob_tensor(blob)))


@pytest.mark.parametrize("numel, data, count, match", [
    (1 << 40, b"\0" * 16, None, "needs 4398046511112 bytes, 24 present"),
    (8, b"\0" * 16, None, "needs 40 bytes, 24 present"),
    (4, b"\0" * 16, 1 << 40, "header declares 4"),
    (4, b"\0" * 20, None, "needs 24 bytes, 28 present"),
])
def test_blob_size_checked_before_allocating(guard, monkeypatch, numel, data, count, match):
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load reached"))
    with pytest.raises(UnsafePickleError, match=match):
        guard.load_bytes(_dumps(_blob_tensor(_legacy_blob(numel, data, count=count))))
    assert calls == []


def test_tensor_view_outside_storage_refused(guard):
    blob = _legacy_blob(4, np.arange(4, dtype="<f4").tobytes())
    with pytest.raises(UnsafePickleError, match="reaches element 9, storage has 4"):
        guard.load_bytes(_dumps(_blob_tensor(blob, size=(9,))))


@pytest.mark.parametrize("version", [5, 7, "6", None])
def test_persistence_version_refused(guard, tmp_path, version):
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    path, _ = _write(tmp_path, "v", cls, kwargs, module_src=guard.src, version=version)
    with pytest.raises(UnsafePickleError, match=r"meta\['version'\] must be 6"):
        guard.load(path)


def test_persid_in_outer_file_refused(guard):
    marker = object()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "evil" if obj is marker else None

    buf = io.BytesIO()
    P(buf, protocol=4).dump({"ema": marker})
    assert any(op.name == "BINPERSID" for op, _, _ in pickletools.genops(buf.getvalue()))
    with pytest.raises(UnsafePickleError, match="PERSID"):
        guard.load_bytes(buf.getvalue())
    with pytest.raises(UnsafePickleError, match="PERSID"):
        guard.load_bytes(b"\x80\x02}X\x03\x00\x00\x00emaPevil\ns.")  # protocol-0 PERSID


def test_known_class_smuggling_a_call_refused(guard, tmp_path):
    """An EDM-looking EDMPrecond whose state holds an os.system REDUCE."""
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    tensors = random_edm_tensors(cls, kwargs)
    ema = edm_tree_from_tensors(tensors, "EDMPrecond", {}, cls, kwargs, module_src=guard.src)
    ema.__dict__["_fake_extra_state"] = {"sigma_data": _Evil(guard.canary)}
    path = tmp_path / "smuggle.pkl"
    write_edm_pickle(path, ema)  # os.system pickles as posix.system on Linux
    with pytest.raises(UnsafePickleError, match="global posix.system is not allowed"):
        guard.load(path)
    # the exact global os.system: name a stand-in that way while dumping
    def system(cmd):
        raise AssertionError("never called")
    system.__module__, system.__qualname__ = "os", "system"
    with guard.monkeypatch.context() as m:
        m.setattr(os, "system", system)
        write_edm_pickle(path, ema)
    assert b"\x8c\x02os\x94\x8c\x06system" in path.read_bytes()
    with pytest.raises(UnsafePickleError, match="global os.system is not allowed"):
        guard.load(path)
    # and inside a tensor's stand-in arguments
    ema2 = edm_tree_from_tensors(tensors, "EDMPrecond", {}, cls, kwargs, module_src=guard.src)
    ema2.model.map_layer0.register_buffer("evil", None)
    ema2.model.map_layer0._buffers["evil"] = _Reduce(subprocess.check_call, ["touch", str(guard.canary)])
    write_edm_pickle(path, ema2)
    with pytest.raises(UnsafePickleError, match="global subprocess.check_call is not allowed"):
        guard.load(path)


def test_stub_argument_checks(guard):
    """Allowed globals called with the wrong arguments are refused too."""
    cases = {
        "numpy.dtype": _call("numpy", "dtype", ("O", False, True)),
        "_codecs.encode": _call("_codecs", "encode", ("abc", "zlib_codec")),
        "ModuleDict args": b"ctorch.nn.modules.container\nModuleDict\n(K\x01t\x81",
        "_reconstruct_persistent_obj": _call("torch_utils.persistence", "_reconstruct_persistent_obj", ("meta",)),
        "_load_from_bytes": _call("torch.storage", "_load_from_bytes", ("not bytes",)),
        "_rebuild_parameter": _call("torch._utils", "_rebuild_parameter", ("x", False, {})),
    }
    for what, ops in cases.items():
        with pytest.raises(UnsafePickleError):
            guard.load_bytes(_ema(ops))


def test_fixtures_canary_never_runs(guard):
    """The shipped fixtures' module_src raises if executed; loading them under the guard is clean."""
    for name in ("ddpmpp_small16", "adm_small16"):
        raw = (FIXTURES / f"{name}.pkl").read_bytes()
        assert b"EDM module source was executed" in raw
        data = guard.load_bytes(raw)
        assert isinstance(data["ema"], PersistentStub) and len(data["ema"].module_src_sha256) == 64
        assert isinstance(data["ema"].state["_modules"]["model"].state["_modules"]["enc"], ContainerStub)
        assert not hasattr(data["ema"], "module_src")
        assert len(flatten(data["ema"])) > 100 and describe(data["ema"]).class_name == "EDMPrecond"


# --------------------------------------------------------------------------------------------------
# Converter refusals and file errors: one clear line each
# --------------------------------------------------------------------------------------------------

def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


@pytest.fixture(scope="module")
def ddpm_snapshot(tmp_path_factory):
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    path = tmp_path_factory.mktemp("edm") / "base.pkl"
    make_edm_pickle(path, cls, kwargs)
    return load_edm_pickle(path)


@pytest.mark.parametrize("change, match", [
    (dict(embedding_type="fourier"), "embedding_type='fourier' .NCSN"),
    (dict(encoder_type="residual"), "encoder_type='residual'"),
    (dict(encoder_type="skip"), "encoder_type='skip'"),
    (dict(decoder_type="skip"), "decoder_type='skip'"),
    (dict(resample_filter=[1, 3, 3, 1]), r"resample_filter=\[1, 3, 3, 1\]"),
    (dict(channel_mult_noise=2), "channel_mult_noise=2"),
    (dict(model_channels=32), r"has shape \[16, 10\] but the constructor kwargs .* imply \[32, 10\]"),
    (dict(num_blocks=2), "lacks tensor model.enc.8x8_block1"),
    (dict(attn_resolutions=[]), "is not part of"),
    (dict(augment_dim=0), "model.map_augment.weight in the pickle is not part of"),
    (dict(label_dim=0), "is not part of"),
    (dict(fancy_option=1), "fancy_option=1 are not constructor arguments"),
    (dict(out_channels=6), "in_channels=3 != out_channels=6"),
    (dict(img_resolution=7), "img_resolution=7 is not divisible by 2\\*\\*1"),
])
def test_converter_refuses_kwargs(ddpm_snapshot, change, match):
    snap = dataclasses.replace(ddpm_snapshot, backbone_kwargs={**ddpm_snapshot.backbone_kwargs, **change},
                               precond_kwargs={})
    with pytest.raises(WeightsError, match=match) as info:
        convert_edm_network(snap, build=False)
    _one_line(info)


def test_ncsnpp_pickle_refused(guard, tmp_path):
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    tensors = random_edm_tensors(cls, kwargs)
    path, _ = _write(tmp_path, "ncsnpp", cls, {**kwargs, "embedding_type": "fourier", "encoder_type": "residual"},
                     tensors=tensors, module_src=guard.src)
    with pytest.raises(WeightsError, match="embedding_type='fourier'") as info:
        convert_edm_network(guard.load(path))
    _one_line(info)


def test_edm2_unknown_and_baseline_refused(guard, tmp_path):
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    tensors = random_edm_tensors(cls, kwargs)
    ema = edm_tree_from_tensors(tensors, "Precond", dict(img_resolution=8), "UNet", dict(img_resolution=8),
                                module_src=guard.src)
    ema.unet = ema.model
    del ema.model
    path = tmp_path / "edm2.pkl"
    write_edm_pickle(path, ema)
    with pytest.raises(WeightsError, match="EDM2 network .Precond with child unet.") as info:
        convert_edm_network(guard.load(path))
    _one_line(info)
    for precond, backbone, match in [("FancyPrecond", cls, "unknown EDM preconditioner class 'FancyPrecond'"),
                                     ("EDMPrecond", "FancyUNet", "unknown EDM backbone class 'FancyUNet'"),
                                     ("VPPrecond", cls, "VPPrecond: the VP baseline preconditioner"),
                                     ("VEPrecond", cls, "VEPrecond"), ("iDDPMPrecond", cls, "iDDPMPrecond")]:
        path, _ = _write(tmp_path, precond + backbone, backbone, kwargs, tensors=tensors, module_src=guard.src,
                         precond_class=precond)
        with pytest.raises(WeightsError, match=match) as info:
            convert_edm_network(guard.load(path))
        _one_line(info)


def test_precond_kwargs_must_agree(ddpm_snapshot):
    for change, match in [(dict(img_channels=1), "img_channels=1 contradicts SongUNet in_channels=3"),
                          (dict(model_type="DhariwalUNet"), "model_type='DhariwalUNet' but its model is a SongUNet"),
                          (dict(model_channels=64), "model_channels=64 contradicts")]:
        snap = dataclasses.replace(ddpm_snapshot, precond_kwargs={**ddpm_snapshot.precond_kwargs, **change})
        with pytest.raises(WeightsError, match=match):
            convert_edm_network(snap, build=False)


def test_bad_resample_filter_refused(ddpm_snapshot):
    tensors = collections.OrderedDict(ddpm_snapshot.tensors)
    tensors["model.enc.4x4_down.conv0.resample_filter"] = torch.full((1, 1, 2, 2), 0.5)
    with pytest.raises(WeightsError, match="expected \\[1, 1, 2, 2\\] of 0.25"):
        convert_edm_network(dataclasses.replace(ddpm_snapshot, tensors=tensors), build=False)


def test_file_errors(guard, tmp_path):
    with pytest.raises(MissingFileError, match="not found"):
        load_edm_pickle(tmp_path / "nope.pkl")
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    path = tmp_path / "noema.pkl"
    write_edm_pickle(path, None, with_ema=False)
    with pytest.raises(WeightsError, match="no 'ema' network") as info:
        guard.load(path)
    _one_line(info)
    good, _ = _write(tmp_path, "good", cls, kwargs, module_src=guard.src)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="not a readable EDM pickle") as info:
        guard.load(truncated)
    _one_line(info)
    listed = tmp_path / "list.pkl"
    listed.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(WeightsError, match="top level is a list"):
        guard.load(listed)
    with pytest.raises(WeightsError, match="cannot read"):
        load_edm_pickle(tmp_path)  # a directory


def test_extra_top_level_keys_ignored(guard, tmp_path):
    cls, kwargs = CONFIGS["adm8_uncond_aug9"]
    path, tensors = _write(tmp_path, "extra", cls, kwargs, module_src=guard.src, extra={"progress": {"kimg": 7}})
    snap = guard.load(path)
    assert snap.extra_keys == ["progress"] and list(snap.tensors) == list(tensors)


# --------------------------------------------------------------------------------------------------
# BUILD opcodes aimed at the loader's own objects
# --------------------------------------------------------------------------------------------------

class _ReduceState(_Reduce):
    """Pickles as ``func(*args)`` followed by a BUILD with ``state``."""

    def __init__(self, func, args, state):
        super().__init__(func, *args)
        self.state = state

    def __reduce__(self):
        return (self.func, self.args, self.state)


def test_build_on_rebuilt_tensor_refused(guard, tmp_path):
    """A BUILD after _rebuild_tensor_v2 (Tensor.__setstate__) could set hooks / requires_grad."""
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    tensors = random_edm_tensors(cls, kwargs)
    for state in [(True, None, collections.OrderedDict()),
                  (False, None, collections.OrderedDict(h=collections.OrderedDict))]:
        ema = edm_tree_from_tensors(tensors, "EDMPrecond", {}, cls, kwargs, module_src=guard.src)
        w = tensors["model.map_layer0.weight"]
        ema.model.map_layer0._parameters["weight"] = _ReduceState(
            torch._utils._rebuild_tensor_v2, (_typed_storage(w.clone()), 0, tuple(w.shape), w.stride(), False,
                                              collections.OrderedDict()), state)
        path = tmp_path / "build_tensor.pkl"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_edm_pickle(path, ema)
        with pytest.raises(UnsafePickleError, match="model.map_layer0.weight: tensor was modified"):
            guard.load(path)


def test_build_on_persistent_stub_refused(guard):
    meta = dict(type="class", version=6, module_src=guard.src, class_name="EDMPrecond", state={})
    obj = _ReduceState(fake_reconstruct, (meta,), (None, {"class_name": "not an identifier", "state": 1}))
    with fake_persistence_modules():
        raw = pickle.dumps({"ema": obj}, protocol=4)
    with pytest.raises(UnsafePickleError, match="BUILD on it is not allowed"):
        guard.load_bytes(raw)


def test_build_on_storage_refused(guard):
    blob = _legacy_blob(4, np.arange(4, dtype="<f4").tobytes())
    storage = _ReduceState(torch.storage._load_from_bytes, (blob,), (None, {"numel": 1 << 40}))
    with pytest.raises(UnsafePickleError, match="rebuilt storage"):
        guard.load_bytes(_dumps(_tensor_via(storage)))


def test_build_on_storage_token_in_header_refused(guard, monkeypatch):
    """A header that BUILDs element_size=0 onto the storage class token (to dodge the size check)."""
    f = io.BytesIO()
    for obj in (LEGACY_MAGIC, 1001, dict(protocol_version=1001, little_endian=True,
                                         type_sizes=dict(short=2, int=4, long=8))):
        pickle.dump(obj, f, protocol=2)
    f.write(b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
            b"N}X\x0c\x00\x00\x00element_sizeK\x00s\x86b"
            b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ" + struct.pack("<i", 1 << 30) + b"NtQ.")
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", 1 << 30))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(UnsafePickleError, match="BUILD on torch.FloatStorage is not allowed"):
        guard.load_bytes(_dumps(_blob_tensor(f.getvalue())))


def test_vendored_persistence_is_opt_in(guard):
    raw = _ema(_call("edm.torch_utils.persistence", "_reconstruct_persistent_obj",
                     (dict(type="class", version=6, module_src=guard.src, class_name="EDMPrecond", state={}),)))
    with pytest.raises(UnsafePickleError, match="edm.torch_utils.persistence._reconstruct_persistent_obj"):
        guard.load_bytes(raw)
    with guard.loading():
        data = SafeEDMUnpickler(io.BytesIO(raw), allow_vendored_persistence=True).load()
    assert isinstance(data["ema"], PersistentStub) and data["ema"].class_name == "EDMPrecond"


def test_edm2_style_easydict_snapshot(guard, tmp_path, monkeypatch):
    """EDM2 snapshots are dnnlib.util.EasyDict (EDM_FORMAT §5): read as a dict, then refused as EDM2."""
    import types

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    pkg, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    util.EasyDict, pkg.util = EasyDict, util
    cls, kwargs = CONFIGS["ddpmpp8_cond_aug9"]
    ema = edm_tree_from_tensors(random_edm_tensors(cls, kwargs), "Precond", {}, "UNet", {}, module_src=guard.src)
    ema.unet = ema.model
    del ema.model
    with monkeypatch.context() as m, fake_persistence_modules():
        m.setitem(sys.modules, "dnnlib", pkg)
        m.setitem(sys.modules, "dnnlib.util", util)
        raw = pickle.dumps(EasyDict(ema=ema, encoder=None, dataset_kwargs=EasyDict(resolution=8)), protocol=4)
    assert b"dnnlib.util" in raw and "dnnlib" not in sys.modules
    path = tmp_path / "edm2.pkl"
    path.write_bytes(raw)
    snap = guard.load(path)
    assert snap.precond == "Precond" and snap.dataset_kwargs == {"resolution": 8} and snap.extra_keys == ["encoder"]
    with pytest.raises(WeightsError, match="EDM2 network"):
        convert_edm_network(snap)
