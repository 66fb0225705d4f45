"""The fused form's Triton kernels (augment/fused_kernels.py), on the CPU under Triton's interpreter.

Each op is held to its reference in ``ops.py`` on the same draws: exactly (float64 in, float64
everywhere) and within the float16 intermediates' rounding (uint8 in). The severity's gradient,
carried forward by the kernels, is held to autograd through the reference form. Images are tiny:
the interpreter runs every program in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import natural_batch
from test_augmix import fixed_params

from augmix_gpu.augment.augmix import AugMixBatch
from augmix_gpu.augment.execute import fused_unavailable
from augmix_gpu.augment.ops import AUGMENTATIONS, AUGMENTATIONS_ALL, OPS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
pytestmark = pytest.mark.skipif(
    fused_unavailable("cpu") is not None, reason=str(fused_unavailable("cpu"))
)
# A value stored in float16 as 255 x is within 1/16 of a level (1/8 above 128) of x.
STORED = 0.125 / 255


def _one_op(name: str, **kw) -> tuple[AugMixBatch, AugMixBatch]:
    """The fused and the static form of one chain per view (no mixing, no normalisation)."""
    shape = {"num_views": 1, "width": 1, "all_ops": True, "normalize": False, **kw}
    return AugMixBatch(strategy="fused", **shape), AugMixBatch(strategy="static", **shape)


def _second(name: str) -> str:
    """A chain of ``name`` then a warp (or a shear after a warp): the tangent passes an op."""
    return "rotate" if OPS[name].affine_term is None else "shear_x"


@pytest.mark.parametrize("name", AUGMENTATIONS_ALL)
def test_each_op_and_its_severity_gradient_equal_the_reference_in_float64(name):
    """Two steps (the op, then a warp), per-sample severity: the same view and the same
    d(loss)/ds as autograd through the static form, to float64 rounding."""
    fused, static = _one_op(name)
    x = natural_batch(2, 12, seed=4).double() / 255
    p = fixed_params(fused, 2, [name, _second(name)], u=0.8, sign=-1.0)
    read_out = torch.rand((1, 2, 3, 12, 12), generator=torch.Generator().manual_seed(0))
    views, grads = {}, {}
    for key, aug in (("fused", fused), ("static", static)):
        s = torch.tensor([6.0, 3.5], dtype=torch.float64, requires_grad=True)
        view = aug.apply(x, p, s)[1]
        (view * read_out[0].double()).sum().backward()
        views[key], grads[key] = view.detach(), s.grad
    torch.testing.assert_close(views["fused"], views["static"], atol=1e-12, rtol=0)
    torch.testing.assert_close(grads["fused"], grads["static"], atol=1e-10, rtol=1e-10)
    assert OPS[name].gradient == "none" or (grads["static"] != 0).all()


@pytest.mark.parametrize("name", [n for n, op in OPS.items() if op.gradient == "exact"])
def test_exact_ops_pass_gradcheck_through_the_fused_kernels(name):
    """test_severity's gradcheck of each exact op in s, on the fused call: the tangents the
    kernels carry forward and the one-reduction backward against finite differences."""
    fused, _ = _one_op(name)
    x = natural_batch(1, 12, seed=11).double() / 255
    p = fixed_params(fused, 1, [name], u=0.7, sign=-1.0)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda sev: fused.apply(x, p, sev)[1], (s,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True
    )


@pytest.mark.parametrize("name", AUGMENTATIONS_ALL)
def test_each_op_on_uint8_is_the_reference_within_float16_storage(name):
    """One op on a uint8 image: read exactly, computed in float32, stored once in float16."""
    fused, static = _one_op(name)
    x = natural_batch(1, 12, seed=5)
    p = fixed_params(fused, 1, [name], u=0.7, sign=1.0)
    a, b = fused.apply(x, p, 5.0)[1], static.apply(x, p, 5.0)[1]
    torch.testing.assert_close(a, b, atol=STORED + 1e-6, rtol=0)


def test_finished_chains_are_skipped_and_depth_0_is_the_clean_image():
    """depth 1 of 3: steps 2 and 3 leave the chain as it was; depth 0 (hand-made): clean."""
    fused, static = _one_op("equalize")
    x = natural_batch(2, 10, seed=6).double() / 255
    p = fixed_params(fused, 2, ["equalize", "rotate", "posterize"], depth=1)
    p.depth[..., 1] = 0
    a, b = fused.apply(x, p, 4.0)[1], static.apply(x, p, 4.0)[1]
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(a[1], x[1], atol=0, rtol=0)


def test_the_network_input_is_written_in_its_dtype_and_layout():
    """bf16 channels_last, with or without the clean images: the tuple's values, cast once."""
    aug = AugMixBatch(strategy="fused")
    x = natural_batch(2, 10, seed=7)
    views = aug(x, generator=torch.Generator().manual_seed(3))
    batch = aug.network_input(
        x, torch.Generator().manual_seed(3), dtype=torch.bfloat16, channels_last=True
    )
    assert batch.dtype == torch.bfloat16 and batch.shape == (6, 3, 10, 10)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.cat(views).to(torch.bfloat16))
    only_views = aug.network_input(x, torch.Generator().manual_seed(3), clean=False)
    assert only_views.dtype == torch.float32 and torch.equal(only_views, torch.cat(views[1:]))


def test_the_trainer_feeds_the_network_the_input_the_fused_form_writes():
    """AugmentedClassifier.views: the network's input in its amp dtype and layout, straight from
    the mix kernel (the JSD modes: [clean; v1; v2]; ``augmix``: the one view)."""
    from augmix_gpu.train.step import AugmentedClassifier

    x = natural_batch(2, 8, seed=8)
    for aug_type, views in (("augmix_jsd", 2), ("augmix", 1)):
        aug = AugMixBatch(strategy="fused", num_views=views)
        net = AugmentedClassifier(torch.nn.Identity(), aug_type, aug, amp_dtype=torch.bfloat16,
                                  channels_last=True)  # fmt: skip
        batch = net.views(x, torch.Generator().manual_seed(1))
        outputs = aug(x, torch.Generator().manual_seed(1))  # (clean, view_1, ...)
        expected = torch.cat(outputs if aug_type == "augmix_jsd" else outputs[1:])
        assert batch.dtype == torch.bfloat16 and batch.shape == expected.shape
        assert batch.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(batch, expected.to(torch.bfloat16))


def test_a_call_reads_nothing_back_and_launches_few_kernels():
    """Sampling included: 12 draws + (statistics + step) per depth step + one mix, forward;
    the learnable forward + backward adds the severity's draw and one reduction. No host read."""
    from count_bytes import counting

    from augmix_gpu.augment.severity import LearnableSeverity

    x = natural_batch(1, 8)
    aug = AugMixBatch(strategy="fused")
    aug(x)  # the first call builds the kernels' op table
    with counting() as fixed:
        aug(x)
    assert fixed.host_reads == 0 and fixed.kernels <= 24, fixed
    aug = AugMixBatch(strategy="fused", severity=LearnableSeverity())
    aug(x)
    with counting() as learnable:
        aug.network_input(x).sum().backward()
    assert learnable.host_reads == 0 and aug.severity.log_severity_mu.grad is not None


def test_a_batch_that_requires_grad_is_refused_in_one_line():
    x = (natural_batch(1, 8).float() / 255).requires_grad_(True)
    with pytest.raises(ValueError, match="severity only: use strategy 'static' or 'grouped'"):
        AugMixBatch(strategy="fused")(x)


def test_without_cuda_or_the_interpreter_it_stops_with_one_line():
    code = (
        "import torch; from augmix_gpu.augment.augmix import AugMixBatch\n"
        "AugMixBatch(strategy='fused')(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert (
        "RuntimeError: strategy 'fused' on the CPU runs under Triton's interpreter" in done.stderr
    )
    assert "TRITON_INTERPRET=1" in done.stderr.strip().splitlines()[-1]


def test_every_op_of_the_table_has_a_kernel_branch():
    from augmix_gpu.augment.fused_kernels import op_table

    table = op_table(tuple(OPS.values()))
    assert table.shape == (len(OPS), 2) and len(set(AUGMENTATIONS)) == 9
    geometric = [i for i, op in enumerate(OPS.values()) if op.affine_term is not None]
    assert (table[geometric, 0] == 0).all() and len(set(table[:, 0].tolist())) == 9


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from augmix_gpu.augment import fused_kernels as K

def build(fn, types, constexprs):
    names = fn.arg_names
    signature = dict(zip(names, types + ["constexpr"] * (len(names) - len(types))))
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32))

flags = dict(FROM_BATCH=False, SRC_U8=False, TANGENT=True)
build(K._step_kernel, ["*fp16", "*fp16", "*fp32", "*fp32", "*i64", "*i64", "*fp32", "*fp32",
      "*fp32", "i32", "fp32", "*i32", "*fp32"] + ["i32"] * 6,
      dict(flags, HAS_SEV=True, LEVEL_LOW=0.1, MARGIN=4e-6, THRESHOLD_TOP=255.999, GAIN=63.75,
           BLOCK=K.STEP_BLOCK))
build(K._stats_kernel, ["*fp16", "*fp16", "*fp32", "*fp32", "*i64", "*i64", "*i32"] + ["i32"] * 6,
      dict(flags, BLOCK=K.STATS_BLOCK))
build(K._mix_kernel, ["*u8", "*fp16", "*fp32", "*i64", "*fp32", "*fp32", "*fp32", "*bf16",
      "*fp32"] + ["i32"] * 10, dict(SRC_U8=True, NORMALIZE=True, TANGENT=True, BLOCK=K.MIX_BLOCK))
build(K._grad_kernel, ["*bf16", "*fp32", "*fp32"] + ["i32"] * 8, dict(BLOCK=K.MIX_BLOCK))
print("compiled")
"""


def test_the_kernels_compile_for_an_h100():
    """The interpreter runs Python; a GPU compiles. Compile every kernel for sm_90 (no GPU needed:
    Triton ships the NVIDIA compiler), the tangent variants, which hold every code path."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]
