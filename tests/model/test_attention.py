"""The attention-backend registry: reasons, `auto`, config errors; the row layouts; every backend that runs here
against the sdpa reference, directly and through transformers' attention registry."""

import pytest
import torch

from merv_fast.config import ConfigError, get_preset
from merv_fast.model import attention
from merv_fast.model.attention import Documents, availability, backend_of, install, resolve_attention
from merv_fast.model.llm import build_llm, llm_forward


def test_every_backend_says_why_on_cpu():
    report = availability("cpu")
    assert list(report) == ["sdpa", "flex", "flash_attn", "xformers"]
    assert report["sdpa"][0]
    for name, (ok, why) in report.items():
        assert why, name
    assert not report["flex"][0] and "backward on CPU" in report["flex"][1]
    for name in ("flash_attn", "xformers"):
        assert not report[name][0]  # not installed here, or installed but there is no CUDA device


def test_auto_and_explicit_requests():
    assert resolve_attention("auto", "cpu") == ("sdpa", "auto on cpu: sdpa (the others need CUDA)")
    assert resolve_attention("sdpa", "cpu")[0] == "sdpa"
    with pytest.raises(ConfigError, match="llm.attention='flash_attn' is not available on cpu"):
        resolve_attention("flash_attn", "cpu")
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_attention("eager", "cpu")


def test_config_rejects_unknown_attention_and_loss():
    from merv_fast.config import apply_overrides

    with pytest.raises(ConfigError, match="llm.attention='fast'"):
        apply_overrides(get_preset("tiny"), {"llm.attention": "fast"})
    with pytest.raises(ConfigError, match="llm.loss='liger'"):
        apply_overrides(get_preset("tiny"), {"llm.loss": "liger"})


def test_documents_layouts():
    docs = Documents([[3, 2], [5]], torch.device("cpu"))
    assert docs.doc_ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, 2]]
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 10] and docs.max_seqlen == 5
    mask = docs.dense_mask()[0, 0]
    assert mask.tolist()[3] == [False, False, False, True, False] and mask.tolist()[2] == [True, True, True, False,
                                                                                            False]
    assert Documents.from_padding_mask(torch.tensor([[1, 1, 0], [1, 1, 1]])).segments == [[2, 1], [3]]
    with pytest.raises(ValueError, match="right-padded"):
        Documents.from_padding_mask(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="tile"):
        Documents([[3], [2]], torch.device("cpu"))


def _qkv(seed, batch=2, heads=4, kv_heads=2, length=13, dim=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, kv_heads, length, dim, generator=g),
            torch.randn(batch, kv_heads, length, dim, generator=g))


def test_sdpa_reference_is_attention_within_each_segment():
    q, k, v = _qkv(1)
    docs = Documents([[5, 8], [13]], torch.device("cpu"))
    out = attention.sdpa_documents(q, k, v, docs, scaling=0.3)
    for row, segments in enumerate(docs.segments):
        start = 0
        for n in segments:
            sl = slice(start, start + n)
            alone = torch.nn.functional.scaled_dot_product_attention(
                q[row:row + 1, :, sl], k[row:row + 1, :, sl].repeat_interleave(2, 1),
                v[row:row + 1, :, sl].repeat_interleave(2, 1), is_causal=True, scale=0.3)
            torch.testing.assert_close(out[row:row + 1, sl], alone.transpose(1, 2))
            start += n


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_per_segment_equals_the_dense_mask_forward_and_backward(dtype, tol):
    """`sdpa_packed`'s kernel (one SDPA call per segment, no mask) against the dense block-diagonal reference, with
    grouped KV heads, a 1-token segment and a padding tail; every input's gradient too."""
    docs = Documents([[5, 1, 7], [9, 4]], torch.device("cpu"))
    leaves = [[t.to(dtype).requires_grad_() for t in _qkv(5)] for _ in range(2)]
    outs = [kernel(*qkv, docs, 0.3) for kernel, qkv in zip((attention.sdpa_segments, attention.sdpa_documents),
                                                           leaves)]
    assert outs[0].shape == (2, 13, 4, 8)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=tol, atol=tol)
    grad = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    for out in outs:
        out.backward(grad)
    for mine, ref in zip(*leaves):
        torch.testing.assert_close(mine.grad.float(), ref.grad.float(), rtol=tol, atol=tol)


def test_packed_training_swaps_sdpa_for_the_per_sample_calls():
    """install_for_packing: sdpa becomes `sdpa_packed` (registered with transformers), whose packed rows equal
    transformers' sdpa on the dense mask, and whose plain calls (no documents: generation) are transformers' sdpa."""
    sdpa, packed = _tiny_llm("sdpa"), _tiny_llm("sdpa")
    assert attention.install_for_packing(packed) == "sdpa_packed"
    assert packed.config._attn_implementation == "merv_sdpa_packed" and backend_of(sdpa) == "sdpa"
    assert attention.install_for_packing(_tiny_llm("flex")) == "flex"  # the other backends take packed rows as is
    assert_same_as_sdpa(sdpa, packed, seed=7)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_matches_sdpa_on_cpu():
    """PyTorch runs FlexAttention's forward (not its backward) on CPU: check the document mask there."""
    q, k, v = _qkv(2, length=150)  # over one 128-token block
    docs = Documents([[40, 90, 20], [150]], torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(attention.flex_documents(q, k, v, docs, 0.25),
                                   attention.sdpa_documents(q, k, v, docs, 0.25), rtol=1e-5, atol=1e-5)


def _tiny_llm(backend):
    torch.manual_seed(0)
    llm = build_llm(get_preset("tiny").llm)
    install(llm, backend)
    return llm.eval()


def assert_same_as_sdpa(sdpa, other, seed):
    """`other`'s logits equal transformers' sdpa's: on packed rows (documents; sdpa on the dense mask) and on a
    plain call with a padding mask (no documents: `other` falls back to transformers' sdpa)."""
    cfg = get_preset("tiny").llm
    embeds = torch.randn(2, 20, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    docs = Documents([[7, 13], [12, 8]], torch.device("cpu"))
    positions = torch.tensor([list(range(7)) + list(range(13)), list(range(12)) + list(range(8))])
    with torch.no_grad():
        outs = [llm_forward(llm, embeds, None, None, docs, positions).logits for llm in (sdpa, other)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[1, 15:] = 0
        plain = [llm(inputs_embeds=embeds, attention_mask=mask).logits for llm in (sdpa, other)]
        torch.testing.assert_close(plain[1], plain[0])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_registered_backend_through_transformers():
    """flex installed as `merv_flex` through AttentionInterface: packed rows (documents) equal sdpa's dense mask, and
    without documents (a plain call with a padding mask) it is transformers' sdpa."""
    sdpa, flex = _tiny_llm("sdpa"), _tiny_llm("flex")
    assert backend_of(flex) == "flex" and flex.config._attn_implementation == "merv_flex"
    assert_same_as_sdpa(sdpa, flex, seed=3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_registered_backend_under_autocast():
    """Under bf16 autocast RoPE leaves q and k in fp32 and v in bf16: the backend gets one dtype, as sdpa does."""
    sdpa, flex = _tiny_llm("sdpa"), _tiny_llm("flex")
    cfg = get_preset("tiny").llm
    embeds = torch.randn(2, 20, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    docs = Documents([[7, 13], [20]], torch.device("cpu"))
    positions = torch.tensor([list(range(7)) + list(range(13)), list(range(20))])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [llm_forward(llm, embeds, None, None, docs, positions).logits for llm in (sdpa, flex)]
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=1e-2)


def test_env_lists_each_attention_backend():
    from merv_fast import env

    report = env.environment_report()
    assert set(report["attention"]["backends"]) == {"sdpa", "flex", "flash_attn", "xformers"}
    assert report["attention"]["auto"] == "sdpa" and report["attention"]["why"]
    text = env.format_report(report)
    for name, info in report["attention"]["backends"].items():
        line = next(line for line in text.splitlines() if line.startswith(f"attention {name} "))
        state = line[len(f"attention {name}"):].strip()
        # the line says exactly what the report says, and why
        assert state.startswith("available: " if info["available"] else "not available: "), line
        assert info["why"] and state.endswith(info["why"]), line
    assert report["attention"]["backends"]["sdpa"]["available"]  # torch's own SDPA is usable everywhere
    if not torch.cuda.is_available():  # the others need CUDA (flex: no backward on CPU)
        assert not any(report["attention"]["backends"][n]["available"] for n in ("flash_attn", "xformers"))
    assert any(line.startswith("attention auto") for line in text.splitlines())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "flash_attn", "xformers"])
def test_backend_matches_sdpa_reference_on_gpu(backend):
    """Forward and backward of each installed backend against the dense-mask sdpa reference, bf16, on CUDA."""
    device = torch.device("cuda")
    ok, why = attention.AVAILABLE[backend](device, torch.bfloat16)
    if not ok:
        pytest.skip(why)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(s, generator=g).to(device, torch.bfloat16).requires_grad_()
               for s in ((2, 8, 300, 64), (2, 4, 300, 64), (2, 4, 300, 64)))
    docs = Documents([[100, 150, 50], [299, 1]], device)
    dy = torch.randn(2, 300, 8, 64, generator=g).to(device, torch.bfloat16)
    results = []
    for kernel in (attention.KERNELS[backend], attention.sdpa_documents):
        out = kernel(q, k, v, docs, 0.125)
        grads = torch.autograd.grad(out, (q, k, v), dy)
        results.append((out, *grads))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
