"""Merge methods: exact algebraic identities on tiny models, streaming = in-memory, bad input."""

import itertools

import pytest
import torch
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.ops import gram_matrices, merge, merge_files, merge_state_dicts
from brickwork.ops.merge import METHODS, MergeOptions, TensorSource, merge_tensor
from brickwork.persist import load_tensors, read_meta, save_tensors
from brickwork.registry import REGISTRY


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.BatchNorm1d(7), nn.Linear(7, 3))


def states(*seeds: int) -> list[dict[str, torch.Tensor]]:
    return [mlp(s).state_dict() for s in seeds]


def ones_like_stats(model_state: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """Equal statistics: Fishers of ones, or identity Grams for each linear weight."""
    if method == "fisher":
        return {k: torch.ones_like(v) for k, v in model_state.items() if v.is_floating_point()}
    return {k: torch.eye(v.shape[1]) for k, v in model_state.items() if k.endswith("weight") and v.dim() == 2}


def run(method: str, models, base=None, **kw):
    stats = None
    if method in ("fisher", "regmean") and "statistics" not in kw:
        stats = [ones_like_stats(models[0], method) for _ in models]
    return merge_state_dicts(models, method, base=base, statistics=kw.pop("statistics", stats), **kw)


EXTRA = {"ties": {"density": 1.0}, "dare_linear": {"density": 1.0}, "dare_ties": {"density": 1.0}}


@pytest.mark.parametrize("method", METHODS)
def test_n_copies_of_one_model_merge_back_to_it_exactly(method):
    m, base = mlp(0).state_dict(), mlp(1).state_dict()
    n = 2 if method == "slerp" else 3
    kw = dict(EXTRA.get(method, {}))
    if method in ("task_arithmetic", "dare_linear"):
        kw["normalize"] = True  # the sum of N equal task vectors over N
    out = run(method, [m] * n, base=base, **kw)
    for k in m:
        assert torch.equal(out[k], m[k]), k


def test_dare_and_ties_below_full_density_of_copies_of_the_base_are_the_base():
    base = mlp(1).state_dict()
    for method in ("ties", "dare_ties", "dare_linear"):
        out = run(method, [base] * 3, base=base, density=0.3)
        assert all(torch.equal(out[k], base[k]) for k in base), method


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_t_zero_and_one_return_the_ends(method):
    a, b = states(0, 1)
    for t, end in ((0.0, a), (1.0, b)):
        kw = {"t": t} if method == "slerp" else {"weights": [1 - t, t]}
        out = run(method, [a, b], **kw)
        assert all(torch.equal(out[k], end[k]) for k in a), (method, t)


def test_slerp_is_symmetric_under_swap_and_t_to_1_minus_t_and_lerps_when_parallel():
    a, b = states(0, 1)
    ab, ba = run("slerp", [a, b], t=0.3), run("slerp", [b, a], t=0.7)
    for k in a:
        torch.testing.assert_close(ab[k], ba[k], rtol=1e-6, atol=1e-7)
    # near-parallel fallback: b = 2a is parallel, slerp is the lerp (1-t) a + t 2a
    two = {k: 2 * v if v.is_floating_point() else v for k, v in a.items()}
    out = run("slerp", [a, two], t=0.25)
    torch.testing.assert_close(out["0.weight"], 1.25 * a["0.weight"])
    # orthogonal unit vectors: slerp at 1/2 is (a + b) / sqrt(2)
    ea, eb = {"v": torch.tensor([1.0, 0.0])}, {"v": torch.tensor([0.0, 1.0])}
    torch.testing.assert_close(run("slerp", [ea, eb])["v"], torch.tensor([1.0, 1.0]) / 2**0.5)
    # multislerp of two has slerp's direction
    ms = run("multislerp", [ea, eb], weights=[0.7, 0.3])["v"]
    sl = run("slerp", [ea, eb], t=0.3)["v"]
    torch.testing.assert_close(ms, sl)


ORDER_INVARIANT = [m for m in METHODS if m not in ("slerp", "dare_linear", "dare_ties")]


@pytest.mark.parametrize("method", ORDER_INVARIANT)
def test_merges_are_invariant_to_the_order_of_their_inputs(method):
    models, base = states(0, 1, 2), mlp(3).state_dict()
    w = [0.5, 0.3, 0.2]
    stats = None
    if method == "fisher":
        stats = [{k: torch.rand_like(v) for k, v in m.items() if v.is_floating_point()} for m in models]
    if method == "regmean":
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        stats = [
            {
                k: (x := torch.randn(20, v.shape[1], generator=g)).T @ x
                for k, v in m.items()
                if k.endswith("weight") and v.dim() == 2
            }
            for m, g in zip(models, gens, strict=True)
        ]
    ref = merge_state_dicts(
        models, method, base=base, weights=w, statistics=stats, density=0.5 if "ties" in method else None
    )
    for perm in itertools.permutations(range(3)):
        out = merge_state_dicts(
            [models[i] for i in perm],
            method,
            base=base,
            weights=[w[i] for i in perm],
            statistics=None if stats is None else [stats[i] for i in perm],
            density=0.5 if "ties" in method else None,
        )
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-6, msg=f"{method} {perm} {k}")


def test_ties_at_full_density_with_agreeing_signs_is_task_arithmetic():
    base = {"v": torch.zeros(6)}
    t1 = {"v": torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])}
    t2 = {"v": torch.tensor([2.0, -1.0, 1.5, 0.5, -4.0, 0.75])}
    w = [0.6, 0.4]
    peft = run("ties", [t1, t2], base=base, density=1.0, weights=w)["v"]
    ta = run("task_arithmetic", [t1, t2], base=base, weights=[x / 2 for x in w])["v"]  # peft divides by the count
    torch.testing.assert_close(peft, ta)
    mk = run("ties", [t1, t2], base=base, density=1.0, weights=w, ties="mergekit")["v"]
    ta_norm = run("task_arithmetic", [t1, t2], base=base, weights=w, normalize=True)["v"]
    torch.testing.assert_close(mk, ta_norm)


def test_ties_and_task_arithmetic_hand_computed():
    base = {"v": torch.tensor([1.0, 1.0, 1.0])}
    a = {"v": torch.tensor([2.0, -1.0, 1.5])}  # tau [1, -2, .5]
    b = {"v": torch.tensor([0.5, 2.0, 1.5])}  # tau [-.5, 1, .5]
    w = [0.9, 0.1]
    peft = run("ties", [a, b], base=base, density=1.0, weights=w)["v"]
    torch.testing.assert_close(peft, torch.tensor([1.9, -0.8, 1.25]))
    mk = run("ties", [a, b], base=base, density=1.0, weights=w, ties="mergekit")["v"]
    torch.testing.assert_close(mk, torch.tensor([2.0, -1.0, 1.5]))
    ta = run("task_arithmetic", [a, b], base=base, weights=w, scale=0.5)["v"]  # 1 + .5 (.9 tau_a + .1 tau_b)
    torch.testing.assert_close(ta, torch.tensor([1.425, 0.15, 1.25]))
    # density 1/3: one element per vector kept (|-2| of a, |1| of b), signs agree on it
    trimmed = run("ties", [a, b], base=base, density=1 / 3)["v"]
    torch.testing.assert_close(trimmed, torch.tensor([1.0, 1.0 + (-2.0 * 1 + 1.0 * 0) / 1, 1.0]))


def test_ties_keeps_exactly_the_top_density_by_magnitude():
    torch.manual_seed(0)
    base = {"v": torch.zeros(1000)}
    tau = {"v": torch.randn(1000)}
    out = run("ties", [tau], base=base, density=0.25)["v"]
    assert int((out != 0).sum()) == 250
    assert float(out.abs()[out != 0].min()) >= float(tau["v"].abs().topk(250).values.min())
    # the two-pass selection agrees when the tensor is read in many small chunks
    o = MergeOptions(method="ties", density=0.25)
    chunked = merge_tensor("v", [TensorSource(tau, "m")], o, base=TensorSource(base, "b"), chunk_elems=7)
    assert torch.equal(chunked, out)


def test_dare_is_unbiased():
    torch.manual_seed(0)
    base = {"v": torch.randn(200)}
    model = {"v": base["v"] + torch.randn(200)}
    delta = (model["v"] - base["v"]).double()
    p, seeds = 0.3, 400
    draws = torch.stack(
        [
            run("dare_linear", [model], base=base, density=p, seed=s)["v"].double() - base["v"].double()
            for s in range(seeds)
        ]
    )
    kept = (draws != 0).double().mean()
    assert abs(float(kept) - p) < 5 * (p * (1 - p) / draws.numel()) ** 0.5
    # each element: mean of delta * Bernoulli(p) / p over seeds; sd = |delta| sqrt((1-p)/p / seeds)
    sd = delta.abs() * ((1 - p) / p / seeds) ** 0.5
    assert bool(((draws.mean(0) - delta).abs() <= 5 * sd + 1e-6).all())
    # same seed, same draw; other seed, another draw
    a, b = (
        run("dare_ties", [model], base=base, density=p, seed=1),
        run("dare_ties", [model], base=base, density=p, seed=1),
    )
    assert torch.equal(a["v"], b["v"]) and not torch.equal(
        a["v"], run("dare_ties", [model], base=base, density=p, seed=2)["v"]
    )


def test_model_stock_ratio_from_the_angle():
    base = {"v": torch.zeros(2)}
    a, b = {"v": torch.tensor([1.0, 0.0])}, {"v": torch.tensor([0.0, 1.0])}  # orthogonal: cos 0, t 0
    assert torch.equal(run("model_stock", [a, b], base=base)["v"], torch.zeros(2))
    c = {"v": torch.tensor([1.0, 1.0])}  # cos(a, c) = 1/sqrt(2): t = 2c / (1 + c)
    cos = 2**-0.5
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(run("model_stock", [a, c], base=base)["v"], t * torch.tensor([1.0, 0.5]))


def linear_pair(seed: int, n: int) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, generator=g))
    return lin, torch.randn(n, 4, generator=g) * (1 + seed)


def test_regmean_is_least_squares_on_the_concatenated_data_and_the_average_for_equal_grams():
    (l1, x1), (l2, x2) = linear_pair(0, 30), linear_pair(1, 50)
    grams = [gram_matrices(l1, [x1]), gram_matrices(l2, [x2])]
    out = merge([l1, l2], "regmean", statistics=grams, ridge=0.0)
    x = torch.cat([x1, x2]).double()
    y = torch.cat([x1 @ l1.weight.T, x2 @ l2.weight.T]).double()
    want = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(out.weight.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.bias, (l1.bias + l2.bias) / 2)  # other parameters: the average
    same = merge([l1, l2], "regmean", statistics=[grams[0], grams[0]])
    torch.testing.assert_close(same.weight, (l1.weight + l2.weight) / 2)
    # data given instead of statistics: the same Grams are estimated
    from_data = merge([l1, l2], "regmean", data=[x1], statistics=None)
    torch.testing.assert_close(from_data.weight, same.weight)
    # alpha = 0 keeps only the diagonal: a per-input-unit weighted average
    diag = merge([l1, l2], "regmean", statistics=grams, alpha=0.0, ridge=0.0)
    d1, d2 = grams[0]["weight"].diagonal(), grams[1]["weight"].diagonal()
    torch.testing.assert_close(diag.weight.double(), ((l1.weight * d1 + l2.weight * d2) / (d1 + d2)).double())


def test_regmean_on_a_singular_gram_is_the_ridge_least_squares_solution():
    """An input always 0 (MNIST's border pixels) and collinear inputs: both Grams are singular.
    ridge 0 is refused; with a ridge the merge is the minimiser of sum_i w_i (||X_i W^T - X_i W_i^T||^2
    + ridge m ||W - W_i||^2), computed here by one least-squares solve on the stacked, augmented
    system, and the direction no data reaches (input 0) gets the plain average of the two weights."""
    (l1, x1), (l2, x2) = linear_pair(0, 30), linear_pair(1, 50)
    for x in (x1, x2):
        x[:, 0] = 0.0  # never active
        x[:, 3] = 2 * x[:, 2]  # collinear with input 2
    grams = [gram_matrices(l1, [x1]), gram_matrices(l2, [x2])]
    assert int(torch.linalg.matrix_rank(grams[0]["weight"] + grams[1]["weight"])) == 2
    with pytest.raises(BrickworkError, match="singular.*ridge > 0"):
        merge([l1, l2], "regmean", statistics=grams, ridge=0.0)
    ridge, w = 1e-3, (0.3, 0.7)
    out = merge([l1, l2], "regmean", statistics=grams, ridge=ridge, weights=w)
    m = sum(wi * float(g["weight"].diagonal().mean()) for wi, g in zip(w, grams, strict=True)) / sum(w)
    rows, targets = [], []
    for wi, lin, x in zip(w, (l1, l2), (x1, x2), strict=True):
        xd, wd = x.double(), lin.weight.detach().double()
        rows += [wi**0.5 * xd, (wi * ridge * m) ** 0.5 * torch.eye(4, dtype=torch.float64)]
        targets += [wi**0.5 * xd @ wd.T, (wi * ridge * m) ** 0.5 * wd.T]
    want = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    torch.testing.assert_close(out.weight.double(), want, rtol=1e-5, atol=1e-6)
    avg = 0.3 * l1.weight[:, 0] + 0.7 * l2.weight[:, 0]
    torch.testing.assert_close(out.weight[:, 0], avg)
    # the merge minimises the ridge objective: no other candidate (either input, their average, the
    # unregularised least-squares fit of the pooled data) scores lower on it
    with torch.no_grad():

        def objective(wt: torch.Tensor) -> float:
            return sum(
                wi
                * (
                    float((x.double() @ (wt - lin.weight.double()).T).pow(2).sum())
                    + ridge * m * float((wt - lin.weight.double()).pow(2).sum())
                )
                for wi, lin, x in zip(w, (l1, l2), (x1, x2), strict=True)
            )

        x, y = torch.cat([x1, x2]).double(), torch.cat([x1 @ l1.weight.T, x2 @ l2.weight.T]).double()
        candidates = [
            l1.weight.double(),
            l2.weight.double(),
            0.3 * l1.weight.double() + 0.7 * l2.weight.double(),
            torch.linalg.lstsq(x, y).solution.T,
        ]
        best = objective(out.weight.double())
        assert all(best <= objective(c) * (1 + 1e-6) for c in candidates)  # float32 rounding of the output
    with pytest.raises(BrickworkError, match="ridge must be"):
        merge([l1, l2], "regmean", statistics=grams, ridge=-1.0)


@pytest.mark.parametrize("method", METHODS)
def test_float64_inputs_are_not_modified(method):
    """The engine computes in float64: a float64 input's chunk must be copied, never accumulated into."""

    def f64(m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.double() if v.is_floating_point() else v for k, v in m.items()}

    models, base = [f64(m) for m in states(0, 1)], f64(mlp(2).state_dict())
    before = [{k: v.clone() for k, v in m.items()} for m in [*models, base]]
    kw = dict(EXTRA.get(method, {}))
    if method in ("fisher", "regmean"):
        kw["statistics"] = [ones_like_stats(models[0], method) for _ in models]
    merge_state_dicts(models, method, base=base, **kw)
    for m, b in zip([*models, base], before, strict=True):
        for k in m:
            assert torch.equal(m[k], b[k]), (method, k)


def test_fisher_with_equal_fishers_is_linear_and_weights_follow_fisher():
    a, b = states(0, 1)
    eq = run("fisher", [a, b], weights=[0.3, 0.7])
    lin = run("linear", [a, b], weights=[0.3, 0.7])
    for k in a:
        torch.testing.assert_close(eq[k], lin[k], rtol=1e-6, atol=1e-7)
    fa = {k: torch.full_like(v, 3.0) for k, v in a.items() if v.is_floating_point()}
    fb = {k: torch.full_like(v, 1.0) for k, v in a.items() if v.is_floating_point()}
    out = run("fisher", [a, b], statistics=[fa, fb], eps=0.0)
    torch.testing.assert_close(out["0.weight"], 0.75 * a["0.weight"] + 0.25 * b["0.weight"])


def test_fisher_from_data_on_modules():
    from brickwork.ops import fisher_diagonal

    m1, m2 = mlp(0), mlp(1)
    x = torch.randn(6, 5)
    f = fisher_diagonal(m1, [x])
    assert set(f) == {k for k, _ in m1.named_parameters()} and all(bool((v >= 0).all()) for v in f.values())
    out = merge([m1, m2], "fisher", data=[x])
    assert isinstance(out, nn.Sequential) and out is not m1
    assert torch.isfinite(out(x)).all()


def test_merge_copies_and_overrides_by_module_glob():
    m1, m2 = mlp(0), mlp(1)
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    out = merge([m1, m2], "linear", overrides={"3.*": {"weights": [1.0, 0.0]}})
    assert all(torch.equal(v, before[k]) for k, v in m1.state_dict().items())
    assert torch.equal(out[3].weight, m1[3].weight) and torch.equal(out[3].bias, m1[3].bias)
    torch.testing.assert_close(out[0].weight, (m1[0].weight + m2[0].weight) / 2)
    assert REGISTRY.get("op", "merge").obj is merge
    assert {p.name for p in REGISTRY.get("op", "merge").params()} >= {"method", "weights", "density", "overrides"}


@pytest.mark.parametrize(
    "method", ["linear", "ties", "dare_ties", "slerp", "multislerp", "model_stock", "fisher", "regmean"]
)
def test_streaming_merge_equals_in_memory(tmp_path, method):
    models = states(0, 1) if method == "slerp" else states(0, 1, 2)
    base = mlp(5).state_dict()
    paths = [save_tensors(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    save_tensors(tmp_path / "base", base)
    stats, stat_paths = None, None
    if method in ("fisher", "regmean"):
        stats = [ones_like_stats(models[0], method) for _ in models]
        stats[0] = {k: 2 * v for k, v in stats[0].items()}
        stat_paths = [save_tensors(tmp_path / f"s{i}", s) for i, s in enumerate(stats)]
    kw = {"density": 0.5} if "ties" in method else {}
    mem = merge_state_dicts(models, method, base=base, statistics=stats, chunk_elems=8, **kw)
    out = merge_files(
        paths, tmp_path / "out", method, base=tmp_path / "base", statistics=stat_paths, chunk_elems=8, **kw
    )
    got, meta = load_tensors(out.with_suffix(""))
    assert set(got) == set(mem) and all(torch.equal(got[k], mem[k]) for k in mem)
    assert meta["merge"]["method"] == method
    assert [i["sha256"] for i in meta["merge"]["inputs"]] == [read_meta(p.with_suffix(""))["sha256"] for p in paths]
    with pytest.raises(BrickworkError, match="exists"):
        merge_files(paths, tmp_path / "out", method, base=tmp_path / "base", statistics=stat_paths, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_streaming_linear_merge_equals_in_memory_in_every_dtype_over_many_chunks(tmp_path, dtype):
    # The streamed pieces go to a writer thread while the next chunk is summed into a reused
    # buffer: a piece that were a view of that buffer (a float64 sum needs no narrowing) would be
    # overwritten before it is written.
    models = [{k: v.to(dtype) for k, v in m.items()} for m in states(0, 1, 2)]
    paths = [save_tensors(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    mem = merge_state_dicts(models, "linear", weights=[0.5, 0.3, 0.2], chunk_elems=8)
    out = merge_files(paths, tmp_path / "out", "linear", weights=[0.5, 0.3, 0.2], chunk_elems=8)
    got, _ = load_tensors(out.with_suffix(""))
    assert all(got[k].dtype == dtype and torch.equal(got[k], mem[k]) for k in mem)
    want = {k: sum(w * m[k].double() for w, m in zip([0.5, 0.3, 0.2], models, strict=True)).to(dtype) for k in mem}
    eps = torch.finfo(dtype).eps
    for k in mem:  # the float64 sum rounded once; in float64 itself, a sum's rounding bound
        scale = sum(w * m[k].double().abs() for w, m in zip([0.5, 0.3, 0.2], models, strict=True))
        err = (mem[k].double() - want[k].double()).abs()
        assert bool((err <= eps * (want[k].double().abs() + (3 * scale if dtype == torch.float64 else 0))).all()), k


def test_bad_input_gets_one_clear_message(tmp_path):
    a, b = states(0, 1)
    other = nn.Sequential(nn.Linear(5, 7)).state_dict()
    with pytest.raises(BrickworkError, match=r"lacks tensor '2.weight'.*different architectures"):
        run("linear", [a, other])
    missing = {k: v for k, v in b.items() if k != "3.bias"}
    with pytest.raises(BrickworkError, match="model 1 lacks tensor '3.bias'"):
        run("linear", [a, missing])
    wide = {**b, "3.weight": torch.zeros(3, 8)}
    with pytest.raises(BrickworkError, match=r"tensor '3.weight': shape \[3, 8\] in model 1, \[3, 7\]"):
        run("linear", [a, wide])
    half = {**b, "0.weight": b["0.weight"].double()}
    with pytest.raises(BrickworkError, match="tensor '0.weight': dtype torch.float64 in model 1"):
        run("linear", [a, half])
    for d in (0.0, 1.5, -0.1):
        with pytest.raises(BrickworkError, match=r"density must be in \(0, 1\]"):
            run("ties", [a, b], base=a, density=d)
    with pytest.raises(BrickworkError, match="slerp merges exactly 2 models, got 1"):
        run("slerp", [a])
    with pytest.raises(BrickworkError, match="needs a base model"):
        run("task_arithmetic", [a, b])
    with pytest.raises(BrickworkError, match="3 weights for 2 models"):
        run("linear", [a, b], weights=[1, 2, 3])
    with pytest.raises(BrickworkError, match="unknown option"):
        run("linear", [a, b], lamda=0.5)
    with pytest.raises(BrickworkError, match="needs statistics"):
        merge_state_dicts([a, b], "fisher")
    with pytest.raises(BrickworkError, match="file not found"):
        merge_files([tmp_path / "nope.safetensors"], tmp_path / "o")


@pytest.mark.parametrize("method", METHODS)
def test_arithmetic_steps_inside_a_chunk_change_no_result(monkeypatch, method):
    """The engine computes SUB elements at a time inside each chunk (below torch's grain size):
    steps of 5 elements, with ragged tails, give the same bits as one step per chunk, and in-memory
    equals chunked reading with them."""
    from brickwork.ops import merge_engine

    models, base = states(0, 1) if method == "slerp" else states(0, 1, 2), mlp(3).state_dict()
    stats = None
    if method in ("fisher", "regmean"):
        stats = [ones_like_stats(models[0], method) for _ in models]
        stats[1] = {k: 3 * v for k, v in stats[1].items()}
    kw = {"density": 0.5} if method in ("ties", "dare_ties", "dare_linear") else {}
    whole = merge_state_dicts(models, method, base=base, statistics=stats, **kw)
    monkeypatch.setattr(merge_engine, "SUB", 5)
    for chunk in (merge_engine.CHUNK, 8):
        stepped = merge_state_dicts(models, method, base=base, statistics=stats, chunk_elems=chunk, **kw)
        if method.startswith("dare") and chunk == 8:
            continue  # DARE's masks are drawn per chunk: another chunk size, another draw
        assert all(torch.equal(stepped[k], whole[k]) for k in whole), (method, chunk)


def test_ties_trim_by_radix_passes_equals_the_whole_tensor_selection(monkeypatch):
    """Large tensors find each model's k-th largest |tau| in two radix passes over the chunks,
    small ones by kthvalue on the whole tensor: forced either way, the merges are bit-identical
    (ties at the threshold included: magnitudes rounded to a few values)."""
    from brickwork.ops import merge_engine

    g = torch.Generator().manual_seed(0)
    base = {"v": torch.randn(40, 25, generator=g)}
    models = [{"v": base["v"] + (torch.randn(40, 25, generator=g) * 4).round() / 4} for _ in range(3)]
    for ties in ("peft", "mergekit"):
        for density in (0.05, 0.3, 0.9):
            whole = run("ties", models, base=base, density=density, ties=ties, chunk_elems=7 * 25)
            monkeypatch.setattr(merge_engine, "SELECT", 0)
            radix = run("ties", models, base=base, density=density, ties=ties, chunk_elems=7 * 25)
            monkeypatch.undo()
            assert torch.equal(whole["v"], radix["v"]), (ties, density)
            kept = (whole["v"] != base["v"]).sum()
            assert 0 < int(kept) <= 1000
