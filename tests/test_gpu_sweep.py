"""The single-sweep sink path on a GPU, through ComfyUI's real WanModel and the Attach node's patch points: the
log-sum-exp comes from the cuDNN attention the model runs (checked bit-identical once per shape), the sampled latent
equals plain sampling bit for bit, and the statistics equal float64 from independently captured q/k."""
import pytest
import torch

from comfy_harness import COMFYUI, NOT_FOUND, load_comfy
from reference import naive_sink

pytestmark = [pytest.mark.skipif(COMFYUI is None, reason=NOT_FOUND),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tests: no CUDA device here")]


def euler(model, x0, ctx, sigmas, to):
    x = x0.clone()
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        to["sigmas"] = torch.full((x.shape[0],), s0, device="cuda")
        with torch.no_grad():
            v = model(x, torch.full((x.shape[0],), s0 * 1000, device="cuda"), ctx, transformer_options=to)
        x = x + (s1 - s0) * v
    return x


def test_single_sweep_sampling_is_bit_identical_and_exact(monkeypatch):
    import importlib
    pack = load_comfy(cpu=False)
    import comfy.ldm.wan.model as wan
    import comfy.ops
    wc = importlib.import_module(pack.__name__ + ".wan_capture")
    comfy_attach = importlib.import_module(pack.__name__ + ".nodes.comfy_attach")
    torch.manual_seed(0)
    model = wan.WanModel(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16,
                         text_dim=4096, device="cuda", dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight") else torch.randn_like(p) * 0.05)
    model.eval()
    x0 = torch.randn(2, 16, 5, 16, 16, device="cuda", dtype=torch.bfloat16)  # grid 5 x 8 x 8, frames of 64
    ctx = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    plain = euler(model, x0, ctx, sigmas, {"cond_or_uncond": [1, 0]})
    calls = []
    real = wan.optimized_attention

    def spy(q, k, v, *args, **kwargs):  # under the override: sees what the model passes, is no override itself
        calls.append((q.detach().clone(), k.detach().clone(), kwargs.get("heads", args[0] if args else None)))
        return real(q, k, v, *args, **kwargs)
    monkeypatch.setattr(wan, "optimized_attention", spy)
    rec = wc.Recorder(wc.RecordingPlan(record_cross=False, record_sink_stats=True, storage_dtype="float32",
                                       store_per_head=True))
    info = wc.describe_model(model, model_type="WAN21")
    to = {"cond_or_uncond": [1, 0]}
    tracker = comfy_attach.install_recorder(to, rec, info)
    rec.begin_pass(sigmas, info)
    out = euler(model, x0, ctx, sigmas, to)
    take = rec.end_pass()
    assert torch.equal(out, plain), "the single-sweep path changed the sampled latent"
    verified = tracker.lse_attention.verified
    assert verified and all(verified.values()), f"cuDNN's output was not bit-identical to ComfyUI's call: {verified}"
    assert take.steps == [0, 1, 2, 3] and len(calls) == 4 * 2 * 2
    for i, (q, k, heads) in enumerate(calls):
        step, block, kind = i // 4, (i // 2) % 2, ("self", "cross")[i % 2]
        if kind != "self":
            continue
        qh = q[1:].view(1, q.shape[1], 2, -1).transpose(1, 2).double().cpu()  # row 1 is cond ([1, 0])
        kh = k[1:].view(1, k.shape[1], 2, -1).transpose(1, 2).double().cpu()
        received, key_max, mass, ent, _ = naive_sink(qh, kh, 64)
        st = take.sink[(step, "cond")]
        torch.testing.assert_close(st["received"][:, block].double(), received, rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(st["key_max"][:, block].double(), key_max, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(st["frame_mass"][:, block].double(), mass, rtol=2e-3, atol=1e-5)
        torch.testing.assert_close(st["entropy"][:, block].double(), ent, rtol=1e-3, atol=1e-3)
