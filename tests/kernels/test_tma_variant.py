"""Which variant of the projection's kernels a launch takes: TMA (tensor descriptors) when it is built for sm_90 or
newer and a descriptor can address every tensor the kernel copies, the pointer kernel otherwise; and the scratch
allocator that descriptors made in a kernel need. Launches are recorded (kernels/aot.py), not run: no GPU needed.
What each variant computes is tested in tests/kernels/triton/test_project_fuse_triton.py."""

import contextvars
import threading

import pytest
import torch

from merv_fast.kernels.dispatch import BackendError, target_arch, tma_compatible, use_target

triton = pytest.importorskip("triton")

from merv_fast.kernels import aot, project_fuse_triton  # noqa: E402


def test_target_is_pinned_in_the_block_and_none_on_cpu():
    cpu = torch.zeros(2)
    assert target_arch(cpu) is None  # the interpreter's tensors: the portable variant
    with use_target(90):
        assert target_arch(cpu) == 90
        with use_target(80):
            assert target_arch(torch.zeros(2, device="meta")) == 80
        assert target_arch(cpu) == 90
    assert target_arch(cpu) is None


@pytest.mark.parametrize("make, ok", [
    (lambda: torch.zeros(3, 5, 8, dtype=torch.bfloat16), True),  # 16-byte rows
    (lambda: torch.zeros(3, 5, 4, dtype=torch.float32), True),
    (lambda: torch.zeros(3, 5, 12, dtype=torch.bfloat16), False),  # 24-byte rows: an odd count of 16-byte chunks
    (lambda: torch.zeros(3, 5, 9, dtype=torch.float16), False),
    (lambda: torch.zeros(3, 5, 24, dtype=torch.float16)[..., 8:16], True),  # aligned column slice
    (lambda: torch.zeros(3, 5, 24, dtype=torch.float16)[..., 2:10], False),  # base 4 bytes off
    (lambda: torch.zeros(3, 8, 16, dtype=torch.float16).transpose(1, 2), False),  # innermost stride not 1
], ids=["bf16", "fp32", "bf16-rows-24B", "fp16-odd", "aligned-slice", "unaligned-base", "transposed"])
def test_tma_compatible(make, ok):
    assert tma_compatible(make()) is ok


def recorded_variants(target, pooled, weight, grad_out):
    """{kernel: USE_TMA} for the three launches the op makes on these tensors, built for sm_<target>."""
    b, _, k = pooled.shape
    d = weight.shape[0]
    scales = torch.zeros(b, k, device=pooled.device)
    with aot.recording(target) as launches:
        project_fuse_triton.forward(pooled, scales, weight, torch.zeros(b, d, device=pooled.device))
        project_fuse_triton.weight_mix_grad(pooled, grad_out, scales, weight, True)
        project_fuse_triton.pooled_grad(grad_out, scales, weight)
    return {launch.kernel.split(".")[1]: launch.kwargs["USE_TMA"] for launch in launches}


ALL_TMA = {"_forward_kernel": True, "_weight_mix_grad_kernel": True, "_pooled_grad_kernel": True}
NO_TMA = dict.fromkeys(ALL_TMA, False)


def tensors(k=3584, d=4096, dtype=torch.bfloat16, device="meta"):
    """pooled [2, 1024, K], weight [D, K], grad_out [2, 1024, D]: merv-7b's widths by default."""
    return (torch.empty(2, 1024, k, dtype=dtype, device=device), torch.empty(d, k, dtype=dtype, device=device),
            torch.empty(2, 1024, d, dtype=dtype, device=device))


def test_sm90_takes_tma_and_sm80_the_pointer_kernel():
    assert recorded_variants(90, *tensors()) == ALL_TMA
    assert recorded_variants(100, *tensors(dtype=torch.float16)) == ALL_TMA  # newer GPUs keep TMA
    assert recorded_variants(80, *tensors()) == NO_TMA


def test_merv_fast_tma_0_keeps_the_pointer_kernel_on_sm90(monkeypatch):
    monkeypatch.setenv("MERV_FAST_TMA", "0")
    assert recorded_variants(90, *tensors()) == NO_TMA
    monkeypatch.setenv("MERV_FAST_TMA", "1")
    assert recorded_variants(90, *tensors()) == ALL_TMA
    monkeypatch.setenv("MERV_FAST_TMA", "maybe")
    with pytest.raises(BackendError, match="MERV_FAST_TMA='maybe'"):
        recorded_variants(90, *tensors())


def test_without_a_target_cpu_tensors_take_the_pointer_kernel():
    pooled, weight, grad_out = tensors(k=64, d=32, device="cpu")
    assert not project_fuse_triton.uses_tma(pooled, weight, grad_out)


def test_a_tensor_no_descriptor_can_address_falls_back_per_kernel():
    # An odd channel count in half precision: weight and pooled rows are not 16-byte multiples.
    assert recorded_variants(90, *tensors(k=33)) == NO_TMA
    # An LLM width that is not a multiple of 8: the output and output-gradient rows.
    assert recorded_variants(90, *tensors(d=100)) == NO_TMA
    # pooled a column slice at 2 columns in (real memory: its base is 4 bytes off): the kernels reading pooled fall
    # back, the pooled gradient (dY and W in, a fresh buffer out) keeps TMA.
    _, weight, grad_out = tensors(k=64, d=32, device="cpu")
    pooled = torch.zeros(2, 1024, 64 + 8, dtype=torch.bfloat16)[..., 2:66]
    assert recorded_variants(90, pooled, weight, grad_out) == {
        "_forward_kernel": False, "_weight_mix_grad_kernel": False, "_pooled_grad_kernel": True}
    # The output gradient in another memory layout (innermost stride not 1): the two kernels reading it.
    pooled, weight, _ = tensors(k=64, d=32)
    grad_out = torch.empty(2, 32, 1024, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    assert recorded_variants(90, pooled, weight, grad_out) == {
        "_forward_kernel": True, "_weight_mix_grad_kernel": False, "_pooled_grad_kernel": False}


def current_allocator():
    from triton.runtime import _allocation

    return _allocation._allocator.get()


def test_scratch_allocator_is_set_where_none_is_and_a_callers_stays():
    def in_fresh_context():
        aot.ensure_scratch_allocator()
        assert current_allocator() is aot._torch_scratch

        def own(size, alignment, stream):
            raise AssertionError("not called here")

        triton.set_allocator(own)
        aot.ensure_scratch_allocator()
        assert current_allocator() is own

        # A thread starts with no allocator (triton keeps it in a ContextVar): the launching thread gets one.
        seen = []
        thread = threading.Thread(target=lambda: (aot.ensure_scratch_allocator(), seen.append(current_allocator())))
        thread.start()
        thread.join()
        assert seen == [aot._torch_scratch]

    # In an empty context, so that the test starts with no allocator and leaves none behind.
    contextvars.Context().run(in_fresh_context)
