"""iRPE buckets and KP-RPE f(P): the spec's bucket table, shapes and parameter counts, zero-init equivalence, the
gathered bias and the contextual terms against naive loops, and where gradients go."""

import contextlib
import shutil

import pytest
import torch

from lafs.models import build_backbone
from lafs.models.rpe import (
    IRPE,
    KPRPE,
    gather_bias,
    num_buckets,
    piecewise_index,
    position_buckets,
    product_buckets,
)


def test_piecewise_index_matches_the_official_table():
    d = torch.arange(14)
    expected = [0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]  # iRPE Eq. 18 at ratio 1.9, truncated
    assert piecewise_index(d).tolist() == expected
    assert piecewise_index(-d).tolist() == [-e for e in expected]
    assert num_buckets(1.9) == 49


def test_product_buckets_by_hand_cached_and_complete():
    b = product_buckets(14, 14)
    assert b.shape == (196, 196) and b.dtype == torch.long
    assert product_buckets(14, 14) is b  # cached: every layer and step reuses it
    assert sorted(b.unique().tolist()) == list(range(49))  # all 49 buckets occur on 14 x 14
    # token (row 0, col 0) vs (row 0, col 3): Δrow 0 -> 3 + 3 = 3 (offset β=3), Δcol -3 -> g=-2 -> 1: 3 * 7 + 1
    assert int(b[0, 3]) == 3 * 7 + 1
    # (row 5, col 2) vs (row 0, col 2): Δrow 5 -> 3 -> 6; Δcol 0 -> 3: 6 * 7 + 3
    assert int(b[5 * 14 + 2, 2]) == 6 * 7 + 3
    assert (b.diagonal() == 24).all()  # zero offset is the centre bucket
    # tokens at grid-centre pixels (Part fViT landmarks on the grid) get the same buckets
    c = torch.arange(14) * 8 + 3.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    rc = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1) / 8
    assert torch.equal(position_buckets(rc), b)


@pytest.mark.parametrize("per_image", [False, True])
def test_gather_bias_equals_a_double_loop(per_image):
    g = torch.Generator().manual_seed(0)
    bsz, heads, n, k = 2, 3, 9, 49
    table = torch.randn(bsz, heads, n, k, generator=g)
    buckets = torch.randint(0, k, (bsz, n, n) if per_image else (n, n), generator=g)
    bias = gather_bias(table, buckets)
    assert bias.shape == (bsz, heads, n, n)
    for b in range(bsz):
        for h in range(heads):
            for i in range(n):
                for j in range(n):
                    bk = buckets[b, i, j] if per_image else buckets[i, j]
                    assert bias[b, h, i, j] == table[b, h, i, bk]


@pytest.mark.parametrize("variant,size,count", [("multihead", "small", 51_744), ("multihead", "base", 206_976),
                                                ("relative", "small", 539), ("absolute", "base", 539)])
def test_kprpe_shapes_and_parameter_counts(variant, size, count):
    cfg = {"small": (12, 8), "base": (24, 16)}[size]
    m = KPRPE(variant, depth=cfg[0], heads=cfg[1])
    assert sum(p.numel() for p in m.parameters()) == count
    kp = torch.rand(2, 5, 2)
    grid = torch.rand(196, 2)
    tables = m(kp, grid)
    assert len(tables) == cfg[0]
    heads = cfg[1] if variant == "multihead" else 1
    assert all(t.shape == (2, heads, 196, 49) for t in tables)


def test_model_parameter_counts_match_table_3():
    """KP-RPE paper, Table 3: ViT-S 95.95M, +iRPE 96.07M, +KP-RPE 96.00M; ViT-B 114.87M, 114.98M, 115.08M."""
    counts = {(n, s): sum(p.numel() for p in build_backbone(n, s).parameters())
              for n in ("vit", "vit_irpe", "vit_kprpe") for s in ("small", "base")}
    assert counts[("vit", "small")] == 95_952_384 and counts[("vit", "base")] == 114_869_760
    assert counts[("vit_kprpe", "small")] - counts[("vit", "small")] == 51_744
    assert counts[("vit_kprpe", "base")] - counts[("vit", "base")] == 206_976
    assert counts[("vit_irpe", "small")] - counts[("vit", "small")] == 3 * 64 * 49 * 12  # 112,896
    assert counts[("vit_irpe", "base")] - counts[("vit", "base")] == 3 * 32 * 49 * 24


def test_absolute_variant_broadcasts_over_queries():
    m = KPRPE("absolute", depth=2, heads=4)
    torch.nn.init.normal_(m.linear.weight)
    tables = m(torch.rand(3, 5, 2), torch.rand(16, 2))
    t = tables[0]
    assert t.shape == (3, 1, 16, 49) and torch.equal(t, t[:, :, :1].expand_as(t)) and tables[1] is t
    assert not torch.equal(t[0], t[1])  # but differs between images


def test_multihead_layout_is_layer_major_then_head():
    m = KPRPE("multihead", depth=2, heads=3)
    with torch.no_grad():
        m.linear.bias.copy_(torch.arange(2 * 3 * 49, dtype=torch.float32))
    tables = m(torch.rand(1, 5, 2), torch.rand(4, 2))
    # output feature (l·H + h)·K + k goes to layer l, head h, bucket k (the official code's layout)
    assert tables[1][0, 2, 0, 5] == (1 * 3 + 2) * 49 + 5


def _pair(name, size="micro", **kw):
    torch.manual_seed(0)
    plain = build_backbone("vit", size, **kw).eval()
    other = build_backbone(name, size, **kw).eval()
    missing, unexpected = other.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("rpe" in k for k in missing), missing
    return plain, other


@pytest.mark.parametrize("name", ["vit_kprpe", "vit_irpe"])
def test_at_initialisation_the_model_is_the_plain_vit(name):
    plain, other = _pair(name)
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    kp = torch.rand(2, 5, 2) * 55
    with torch.no_grad():
        ref = plain(x)["embedding"]
        out = other(x, keypoints=kp)["embedding"] if name == "vit_kprpe" else other(x)["embedding"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kprpe_depends_on_keypoints_once_trained_and_gradients_reach_w_l_only():
    model = build_backbone("vit_kprpe", "micro").train()
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    kp = (torch.rand(2, 5, 2) * 55).requires_grad_(True)
    model(x, keypoints=kp)["embedding"].square().sum().backward()
    w = model.encoder.kprpe.linear.weight
    assert w.grad is not None and w.grad.abs().sum() > 0  # through the gathered bias and SDPA's additive mask
    assert kp.grad is None  # the offsets are computed without gradient
    with torch.no_grad():
        torch.nn.init.normal_(w, std=0.5)
    model.eval()
    with torch.no_grad():
        a = model(x, keypoints=kp.detach())["embedding"]
        b = model(x, keypoints=kp.detach() + 10)["embedding"]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs keypoints"):
        model(x)


def test_irpe_contextual_terms_equal_naive_sums():
    torch.manual_seed(0)
    heads, d, n = 2, 4, 9
    rpe = IRPE(heads, d, mode="ctx", on="qkv", shared_head=False)
    for p in rpe.parameters():
        torch.nn.init.normal_(p)
    q, k = torch.randn(1, heads, n, d), torch.randn(1, heads, n, d)
    attn = torch.rand(1, heads, n, n).softmax(-1)
    buckets = product_buckets(3, 3)
    scale = 0.5
    bias = rpe.logit_bias(q, k, scale, buckets)
    value = rpe.value_term(attn, buckets)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                want = (q[0, h, i] * scale) @ rpe.table_k[h, :, buckets[i, j]] + \
                    (k[0, h, j] * scale) @ rpe.table_q[h, :, buckets[j, i]]
                torch.testing.assert_close(bias[0, h, i, j], want, rtol=1e-5, atol=1e-5)
            want_v = sum(attn[0, h, i, j] * rpe.table_v[h, buckets[i, j]] for j in range(n))
            torch.testing.assert_close(value[0, h, i], want_v, rtol=1e-5, atol=1e-5)
    bias_mode = IRPE(heads, d, mode="bias", on="k", shared_head=False)
    torch.nn.init.normal_(bias_mode.table)
    b = bias_mode.logit_bias(q, k, scale, buckets)
    assert b.shape == (1, heads, n, n) and b[0, 1, 2, 7] == bias_mode.table[1, buckets[2, 7]]


def test_rpe_option_errors():
    with pytest.raises(ValueError, match="KP-RPE variant"):
        KPRPE("both", 2, 2)
    with pytest.raises(ValueError, match="iRPE mode"):
        IRPE(2, 4, mode="ctx2")
    with pytest.raises(ValueError, match="subset of 'qkv'"):
        IRPE(2, 4, on="kx")
    with pytest.raises(KeyError, match="does not take option"):
        build_backbone("vit_kprpe", "micro", kprpe_varient="absolute")


def test_cls_token_models_take_rpe_too():
    """fViT (CLS token) with KP-RPE / iRPE: CLS pairs get a zero bias / an extra bucket; it runs and starts plain."""
    torch.manual_seed(0)
    plain = build_backbone("fvit", "micro", dropout=0.0, emb_dropout=0.0, drop_path=0.0).eval()
    for extra in ({"rpe": "kprpe"}, {"rpe": "irpe", "rpe_on": "qkv"}):
        m = build_backbone("fvit", "micro", dropout=0.0, emb_dropout=0.0, drop_path=0.0, **extra).eval()
        m.load_state_dict(plain.state_dict(), strict=False)
        x = torch.rand(2, 3, 56, 56) * 2 - 1
        with torch.no_grad():
            out = m(x, keypoints=torch.rand(2, 5, 2) * 55)["embedding"]
            torch.testing.assert_close(out, plain(x)["embedding"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["data", "landmarks"])
def test_part_fvit_with_kprpe_on_landmark_tokens(source):
    """Part fViT + KP-RPE: token positions are the landmarks (per-image buckets); P from the data or the CNN."""
    torch.manual_seed(0)
    kw = dict(dropout=0.0, emb_dropout=0.0, drop_path=0.0, landmark_dropout=0.0)
    plain = build_backbone("part_fvit", "micro", **kw).eval()
    m = build_backbone("part_fvit", "micro", rpe="kprpe", keypoint_source=source, **kw).eval()
    m.load_state_dict(plain.state_dict(), strict=False)
    assert m.uses_keypoints == (source == "data")
    assert m.encoder.kprpe.num_keypoints == (5 if source == "data" else 49)
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    kp = {"keypoints": torch.rand(2, 5, 2) * 55} if source == "data" else {}
    with torch.no_grad():
        torch.testing.assert_close(m(x, **kp)["embedding"], plain(x)["embedding"], rtol=1e-5, atol=1e-5)
    m.train()
    m(x, **kp)["embedding"].square().sum().backward()
    assert m.encoder.kprpe.linear.weight.grad.abs().sum() > 0
    # the landmark tokens' buckets are per image, from their (row, col) = (y, x) / patch; the CLS pairs get bucket 49
    lm = m.landmark_cnn.eval()(x).detach()
    b = m.encoder._buckets(49, lm, "cpu")
    assert b.shape == (2, 50, 50) and torch.equal(b[:, 1:, 1:], position_buckets(lm.flip(-1) / 8))
    assert (b[:, 0] == 49).all() and (b[:, :, 0] == 49).all()


# ---- the fused KP-RPE attention (issue 18) against the implementation it replaced ----------------------------------
# The reference is the previous code, kept here: one W_L product for all layers cut into per-layer views, the
# B x H x N x N bias built by an index_select, and scaled_dot_product_attention with that bias as its float mask.


def _reference_tables(self, keypoints, token_positions):
    bsz = keypoints.shape[0]
    n = token_positions.shape[-2]
    with torch.no_grad():
        p = keypoints.detach().to(self.linear.weight.dtype)
        if self.variant == "absolute":
            d = p.reshape(bsz, 1, -1)
        else:
            m = token_positions.to(p.dtype)
            m = m.expand(bsz, n, 2) if m.ndim == 2 else m
            d = (m[:, :, None, :] - p[:, None, :, :]).reshape(bsz, n, -1)
    f = self.linear(d)
    if self.variant == "absolute":
        return [f.view(bsz, 1, 1, self.k).expand(bsz, 1, n, self.k)] * self.depth
    if self.variant == "relative":
        return [f.view(bsz, 1, n, self.k)] * self.depth
    f = f.view(bsz, n, self.depth * self.heads, self.k).transpose(1, 2)
    return list(f.chunk(self.depth, dim=1))


def _reference_gather(table, buckets):
    bsz, heads, n, k = table.shape
    if buckets.ndim == 2:
        flat = (torch.arange(n, device=buckets.device)[:, None] * k + buckets).reshape(-1)
        return table.reshape(bsz, heads, n * k).index_select(2, flat).view(bsz, heads, n, n)
    return table.gather(3, buckets[:, None].expand(bsz, heads, n, n))


@pytest.fixture
def reference_kprpe(monkeypatch):
    """Within ``with reference_kprpe():`` the models compute KP-RPE exactly as the previous code did."""
    from lafs.models import rpe

    @contextlib.contextmanager
    def use():
        with monkeypatch.context() as m:
            m.setattr(rpe, "FUSED_TABLE_ATTENTION", False)
            m.setattr(rpe.KPRPE, "forward", _reference_tables)
            m.setattr(rpe.TableBias, "materialize", lambda self: _reference_gather(self.table, self.buckets))
            yield

    return use


def _train_step(model, x, kp, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same DropPath masks in both runs
    out = model(x, keypoints=kp)["embedding"]
    (out * torch.linspace(-1, 1, out.shape[1])).square().sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("size,variant,threads", [("micro", "multihead", 0), ("micro", "multihead", 1),
                                                  ("micro", "relative", 0), ("micro", "absolute", 0),
                                                  ("small", "multihead", 0)])
def test_kprpe_outputs_and_gradients_equal_the_previous_implementation(reference_kprpe, size, variant, threads):
    """Train step (forward, backward; DropPath on) and evaluation of whole KP-RPE models: the fused path against the
    previous code, every parameter's gradient included.

    GELU instead of the face ViT's ReLU6 here: at ReLU6's kinks a one-ulp difference in the forward flips a unit's
    gradient (measured on ViT-S: one flipped unit moves a weight row's gradient by 3 %, then every layer below by
    1e-3), whichever float32 implementation runs. 4 images: train-mode BatchNorm over 2 is so ill-conditioned that
    both implementations are 1e-4 away from a float64 run. The ReLU6 model's outputs are compared below.
    """
    from lafs.models import rpe

    batch = 4
    torch.manual_seed(0)
    model = build_backbone("vit_kprpe", size, kprpe_variant=variant, mlp_act="gelu").train()
    with torch.no_grad():  # a trained-looking W_L: biases of the logits' own scale
        torch.nn.init.normal_(model.encoder.kprpe.linear.weight, std=0.5)
        torch.nn.init.normal_(model.encoder.kprpe.linear.bias, std=0.5)
    s = model.img_size
    x = torch.rand(batch, 3, s, s) * 2 - 1
    kp = torch.rand(batch, 5, 2) * (s - 1)
    calls = []
    fused = rpe.table_bias_attention

    def counting(*a, **k):
        calls.append(1)
        return fused(*a, **k)

    default_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or default_threads)  # 1 thread: one image at a time (table_bias_attention)
        with pytest.MonkeyPatch.context() as m:
            m.setattr("lafs.models.vit.table_bias_attention", counting)
            out, grads = _train_step(model, x, kp)
    finally:
        torch.set_num_threads(default_threads)
    assert len(calls) == model.encoder.depth  # the fused path ran in every layer
    with reference_kprpe():
        ref_out, ref_grads = _train_step(model, x, kp)
    _assert_close_to_scale(out, ref_out, "embedding")
    assert grads.keys() == ref_grads.keys() and "encoder.kprpe.linear.weight" in grads
    for name, g in grads.items():
        _assert_close_to_scale(g, ref_grads[name], name)
    model.eval()  # evaluation: no gradient, the gathered bias through scaled_dot_product_attention, as before
    with torch.no_grad():
        ev = model(x, keypoints=kp)["embedding"]
        with reference_kprpe():
            ref_ev = model(x, keypoints=kp)["embedding"]
    _assert_close_to_scale(ev, ref_ev, "eval embedding")


def _assert_close_to_scale(a, ref, name, tol=2e-4):
    """float32 agreement relative to the tensor's own scale (train-mode BatchNorm over 2-3 images amplifies rounding;
    against a float64 run the fused path's error is the smaller of the two), with a floor for gradients that are zero
    in exact arithmetic (biases in front of a BatchNorm: both runs give rounding noise ~1e-9 there)."""
    err = float((a - ref).abs().max())
    assert err <= tol * float(ref.abs().max()) + 1e-5, f"{name}: max |diff| {err:.3g}, max |ref| {float(ref.abs().max()):.3g}"


@pytest.mark.parametrize("chunk", [1, 2, None])
@pytest.mark.parametrize("heads_in_table,per_image", [(4, False), (1, False), (4, True), ("expanded", False)])
def test_table_bias_attention_equals_sdpa_with_the_gathered_bias(heads_in_table, per_image, chunk):
    """Output and qkv / table gradients of the fused function against SDPA with the materialised bias (float64 and
    float32), for per-head, head-shared and expanded (absolute) tables, grid and per-image buckets, 1, 2 (3 images:
    a short last chunk) or all images at a time."""
    import torch.nn.functional as F

    from lafs.models.rpe import TableBias, table_bias_attention

    g = torch.Generator().manual_seed(0)
    bsz, heads, n, d, k = 3, 4, 16, 8, 49
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        qkv = torch.randn(bsz, n, 3, heads, d, generator=g, dtype=dtype).requires_grad_(True)
        if heads_in_table == "expanded":  # the absolute variant: one row for every query
            table = torch.randn(bsz, 1, 1, k, generator=g, dtype=dtype).requires_grad_(True)
            used = table.expand(bsz, 1, n, k)
        else:
            table = torch.randn(bsz, heads_in_table, n, k, generator=g, dtype=dtype).requires_grad_(True)
            used = table
        buckets = position_buckets(torch.randint(0, 4, (bsz, n, 2) if per_image else (n, 2), generator=g).float())
        grad = torch.randn(bsz, n, heads * d, generator=g, dtype=dtype)
        bias = TableBias(used, buckets)
        out = table_bias_attention(qkv, bias, 0.3, chunk)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        ref = F.scaled_dot_product_attention(q, kk, v, attn_mask=bias.materialize(), scale=0.3)
        ref = ref.transpose(1, 2).reshape(bsz, n, heads * d)
        for a, b in zip([out, *torch.autograd.grad(out, (qkv, table), grad)],
                        [ref, *torch.autograd.grad(ref, (qkv, table), grad)]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fused_path_only_where_it_applies():
    from lafs.models.rpe import TableBias, can_fuse_table_attention

    q = torch.zeros(1, 4, 16)  # the attention's input, B x N x C
    table = torch.zeros(1, 2, 4, 49, requires_grad=True)
    bias = TableBias(table, torch.zeros(4, 4, dtype=torch.long))
    assert can_fuse_table_attention(q, bias, 0.0)
    assert not can_fuse_table_attention(q, bias, 0.1)  # attention dropout: SDPA
    assert not can_fuse_table_attention(q.double(), bias, 0.0)
    assert not can_fuse_table_attention(q, TableBias(table.detach(), bias.buckets), 0.0)  # no gradient wanted
    with torch.no_grad():
        assert not can_fuse_table_attention(q, bias, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_fuse_table_attention(q, bias, 0.0)


def test_kprpe_trains_under_bf16_autocast_through_the_materialised_bias():
    model = build_backbone("vit_kprpe", "micro").train()
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, keypoints=torch.rand(2, 5, 2) * 55)["embedding"]
    out.float().square().sum().backward()
    assert model.encoder.kprpe.linear.weight.grad.abs().sum() > 0


def test_face_vit_kprpe_outputs_equal_the_previous_implementation(reference_kprpe):
    """ViT-S + KP-RPE as configured (ReLU6): train-mode forward (the fused path) and evaluation outputs."""
    torch.manual_seed(0)
    model = build_backbone("vit_kprpe", "small").train()
    with torch.no_grad():
        torch.nn.init.normal_(model.encoder.kprpe.linear.weight, std=0.5)
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    kp = torch.rand(4, 5, 2) * 111
    for mode in ("train", "eval"):
        model.train(mode == "train")
        outs = []
        for reference in (False, True):
            torch.manual_seed(3)
            with reference_kprpe() if reference else contextlib.nullcontext():
                outs.append(model(x, keypoints=kp)["embedding"].detach())
        _assert_close_to_scale(*outs, f"{mode} embedding")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_kprpe_equals_eager_in_outputs_and_w_l_gradient():
    """Compiled, the KP-RPE table takes the explicit attention (inductor fuses its gather): same numbers as eager's
    fused path."""
    torch.manual_seed(0)
    # no dropout or DropPath: inductor draws its own masks, which would differ from eager's
    model = build_backbone("vit_kprpe", "micro", dropout=0.0, emb_dropout=0.0, drop_path=0.0).train()
    with torch.no_grad():
        torch.nn.init.normal_(model.encoder.kprpe.linear.weight, std=0.5)  # a bias that matters
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    kp = torch.rand(2, 5, 2) * 55
    grads = []
    for net in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        out = net(x, keypoints=kp)["embedding"]
        out.square().sum().backward()
        grads.append((out.detach(), model.encoder.kprpe.linear.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-4)
