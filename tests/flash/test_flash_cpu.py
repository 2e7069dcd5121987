"""ring-flash on the CPU: registration, capability reasons, forcing a kernel, the fused path's exactness."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import ring_core
import ring_flash
from ring_core.deprecation import version_tuple
from ring_core.testing import CASES, Case, check_attention
from ring_flash.attention import RingDilatedAttentionFlash
from ring_flash.fused import fused_dilated_attention

# Lengths that segments divide: the covering branch takes ownership of the kernel's tensors.
DIVISIBLE_CASES = (
    Case("owned-dense", 32, 4, (32,), (1,)),
    Case("owned-dense-causal-gqa", 32, 4, (64,), (1,), kv_heads=2, causal=True),
    Case("owned-dilated", 32, 4, (8, 16), (1, 2)),
    Case("owned-dilated-causal-pad", 48, 4, (8, 16, 48), (1, 2, 4), causal=True, padding=True),
    Case("owned-head-groups", 32, 4, (8, 16), (1, 2), merge="head_groups", causal=True),
)
# Batch of one (the benchmarks' shape), heads divisible by the rates.
BATCH1_CASES = (
    Case("batch1", 48, 4, (8, 16, 48), (1, 2, 4), batch=1, causal=True, padding=True),
    Case("batch1-tail", 40, 4, (16, 32), (2, 4), batch=1),
    Case("batch1-head-groups", 32, 8, (8, 16), (2, 4), merge="head_groups", batch=1, causal=True),
)
GPU_KERNELS = ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn2", "flash_attn3", "flash_attn4", "tuned"]


def hopper(**changes) -> ring_core.KernelRequest:
    """A bf16 request on an H100/H200 (capability 9.0), changed by ``changes``."""
    base = ring_core.KernelRequest("cuda", torch.bfloat16, 128, 16, 16, compute_capability=(9, 0))
    return dataclasses.replace(base, **changes)


def request_reasons(name: str, request: ring_core.KernelRequest) -> list[str]:
    """Reasons of ``name`` against ``request``, without the ones about this machine (no CUDA here)."""
    backend = ring_core.get_registry().kernels[name]
    machine = set(backend.availability_reasons())
    return [r for r in backend.not_supported_reasons(request) if r not in machine]


def test_every_backend_is_registered_with_reasons_on_cpu():
    kernels = ring_core.get_registry().kernels
    for name in GPU_KERNELS:
        assert name in kernels, name
        if not torch.cuda.is_available():
            reasons = kernels[name].availability_reasons()
            assert reasons and any("CUDA" in r for r in reasons), (name, reasons)
    if not torch.cuda.is_available():  # dispatch on the CPU still finds the core kernels
        request = ring_core.KernelRequest.for_tensors(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8))
        assert ring_core.select_kernel(request).name == "cpu_flash"


@pytest.mark.parametrize(
    ("name", "changes", "expected"),
    [
        ("sdpa_cudnn", {"has_mask": True}, "masks"),
        ("sdpa_cudnn", {"num_kv_heads": 4}, "grouped-query"),
        ("sdpa_cudnn", {"dtype": torch.float32}, "dtype float32"),
        ("sdpa_cudnn", {"head_dim": 256}, "head_dim 256 > 128"),
        ("sdpa_cudnn", {"head_dim": 100}, "not a multiple of 8"),
        ("sdpa_cudnn", {"dropout_p": 0.1}, "dropout"),
        ("sdpa_cudnn", {"compute_capability": (7, 5)}, "compute capability"),
        ("sdpa_flash", {"has_mask": True}, "masks"),
        ("sdpa_flash", {"dtype": torch.float64}, "dtype float64"),
        ("sdpa_efficient", {"dropout_p": 0.1}, "dropout"),
        ("sdpa_efficient", {"num_kv_heads": 4}, "grouped-query"),
        ("flash_attn3", {"compute_capability": (8, 0)}, "compute capability"),
        ("flash_attn3", {"compute_capability": (10, 0)}, "compute capability"),
    ],
)
def test_backends_reject_what_they_cannot_do(name, changes, expected):
    assert request_reasons(name, hopper()) == []
    reasons = request_reasons(name, hopper(**changes))
    assert any(expected in r for r in reasons), reasons


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("sdpa_flash", {"num_kv_heads": 4}),
        ("sdpa_efficient", {"has_mask": True}),
        ("sdpa_efficient", {"dtype": torch.float32}),
        ("sdpa_cudnn", {"causal": True}),
    ],
)
def test_backends_accept_what_they_declare(name, changes):
    assert request_reasons(name, hopper(**changes)) == []


def test_every_backend_rejects_the_cpu():
    for name in GPU_KERNELS:
        assert any("device cpu" in r for r in request_reasons(name, hopper(device_type="cpu"))), name


def test_optional_libraries_say_how_to_install_them():
    kernels = ring_core.get_registry().kernels
    for name, module in (("flash_attn2", "flash_attn"), ("flash_attn3", "flash_attn_interface")):
        reasons = kernels[name].availability_reasons()
        try:
            __import__(module)
        except ImportError:
            assert any(f"{module} is not installed" in r for r in reasons), reasons


def test_hopper_priorities_put_cudnn_first(monkeypatch):
    """After ``tuned`` (which declines where the card has no measured table)."""
    from ring_flash import gpu_kernel, kernels

    monkeypatch.setattr(gpu_kernel, "_capability", lambda: (9, 0))
    order = [k.name for k in sorted(kernels.all_kernels(), key=lambda k: -k.priority)]
    assert order[:2] == ["tuned", "sdpa_cudnn"]
    assert order.index("sdpa_flash") < order.index("sdpa_efficient")


def test_flash_attn_2_and_3_are_marked_untested_here():
    kernels = ring_core.get_registry().kernels
    for name in ("flash_attn2", "flash_attn3"):
        assert "untested here" in kernels[name].description
    assert "untested" not in kernels["flash_attn4"].description


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_forcing_a_gpu_kernel_on_cpu_is_a_clear_error(how, monkeypatch):
    q = torch.randn(1, 8, 2, 8)
    if how == "argument":
        attn = ring_core.create_attention(
            "ring_dilated_flash", segment_lengths=[4], dilation_rates=[1], kernel="sdpa_cudnn"
        )
    else:
        monkeypatch.setenv("RING_ATTENTION_KERNEL", "sdpa_cudnn")
        attn = ring_core.create_attention("ring_dilated_flash", segment_lengths=[4], dilation_rates=[1])
    with pytest.raises(ring_core.KernelNotAvailableError, match="sdpa_cudnn.*device cpu"):
        attn(q, q, q)


def test_forcing_an_unknown_kernel_lists_the_known_ones():
    q = torch.randn(1, 8, 2, 8)
    attn = RingDilatedAttentionFlash([4], [1], kernel="nope")
    with pytest.raises(ring_core.KernelNotAvailableError, match="sdpa_cudnn"):
        attn(q, q, q)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="layout"):
        RingDilatedAttentionFlash([4], [1], layout="spiral")
    with pytest.raises(ValueError, match="dilation_rates"):
        RingDilatedAttentionFlash([4, 8], [1])
    with pytest.raises(TypeError, match="kernel"):
        RingDilatedAttentionFlash([4], [1], kernel=3)


def test_registered_implementation():
    impl = ring_core.resolve_implementation("ring_dilated_flash")
    assert impl.cls is RingDilatedAttentionFlash and impl.package == "ring-flash"
    assert impl.available and "cuda" in impl.devices
    assert ring_core.resolve_implementation("RingDilatedAttentionFlash") is impl


def test_auto_picks_it_on_cuda():
    best, lines = ring_core.explain_auto("attention", device="cuda", world_size=1)
    assert best.name == "ring_dilated_flash", lines


def test_deprecated_name_from_the_module_warns():
    with pytest.warns(
        FutureWarning, match=r"RingDilatedAttentionV2Flash.*removed in ring-flash 0\.3\.0.*RingDilatedAttentionFlash"
    ):
        cls = ring_flash.RingDilatedAttentionV2Flash
    assert cls is RingDilatedAttentionFlash


def test_deprecated_name_from_the_factory_warns():
    with pytest.warns(FutureWarning, match="use RingDilatedAttentionFlash"):
        attn = ring_core.create_attention("RingDilatedAttentionV2Flash", segment_lengths=[4], dilation_rates=[1])
    assert isinstance(attn, RingDilatedAttentionFlash)


def test_canonical_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ring_core.create_attention("ring_dilated_flash", segment_lengths=[4], dilation_rates=[1])
        _ = ring_flash.RingDilatedAttentionFlash


def test_deprecations_are_removed_on_time():
    for old, (_, removal) in ring_flash.DEPRECATED.items():
        assert version_tuple(ring_flash.__version__) < version_tuple(removal), f"remove {old} now"


class Fused(torch.nn.Module):
    """The fused path with one kernel and options, as an attention module."""

    def __init__(self, case, kernel, **options):
        super().__init__()
        self.case, self.kernel, self.options = case, kernel, options

    def forward(self, q, k, v, *, is_causal=False, key_padding_mask=None):
        backend = ring_core.get_registry().kernels[self.kernel]
        out, lse = fused_dilated_attention(
            q, k, v, backend=backend, scale=q.shape[-1] ** -0.5, is_causal=is_causal,
            key_padding_mask=key_padding_mask, **self.case.config, **self.options,
        )  # fmt: skip
        assert lse.shape == q.shape[:3]
        return out


@pytest.mark.parametrize("case", CASES + DIVISIBLE_CASES + BATCH1_CASES, ids=str)
@pytest.mark.parametrize(
    ("kernel", "options"),
    [
        ("math", {}),
        ("cpu_flash", {"max_rows": 24}),  # cut every kernel call into chunks of segments
        ("cpu_flash", {"accumulate_fp32": True}),
    ],
    ids=["math", "chunked", "fp32-accumulators"],
)
def test_fused_path_is_exact(case, kernel, options):
    result = check_attention(Fused(case, kernel, **options), case, torch.float64, seed=11)
    assert result.passed, result.errors


def test_fused_lse_matches_the_engine():
    q, k, v = (torch.randn(2, 40, 4, 8, dtype=torch.float64) for _ in range(3))
    config = {"segment_lengths": [8, 16], "dilation_rates": [1, 2], "is_causal": True}
    _, expected = ring_core.dilated_attention(q, k, v, return_lse=True, **config)
    backend = ring_core.get_registry().kernels["cpu_flash"]
    _, lse = fused_dilated_attention(q, k, v, backend=backend, scale=8**-0.5, **config)
    torch.testing.assert_close(lse.transpose(1, 2), expected, rtol=1e-12, atol=1e-12)


def test_float32_inputs_keep_float32_accuracy():
    case = CASES[3]  # dilated, causal, GQA
    result = check_attention(Fused(case, "cpu_flash"), case, torch.float32, seed=5)
    assert result.passed, result.errors


def test_dropout_in_training_uses_the_engine_and_is_off_in_eval():
    q, k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64) for _ in range(3))
    attn = RingDilatedAttentionFlash([8], [1], dropout=0.5)
    reference = ring_core.reference_attention(q, k, v, segment_lengths=[8], dilation_rates=[1])
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), reference)
    attn.train()
    assert not torch.allclose(attn(q, k, v), reference)


def test_info_shows_the_backends_and_their_reasons(capsys):
    from ring_core.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    for name in GPU_KERNELS:
        assert name in lines, name
        if not torch.cuda.is_available():
            assert "no: " in lines[name], lines[name]
    assert "RingDilatedAttentionV2Flash (removed in 0.3.0)" in lines["ring_dilated_flash"]
