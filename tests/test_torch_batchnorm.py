"""BatchNorm statistics at x: the helper against statistics measured directly, in float64."""

import torch

import sf_torch


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7),
        torch.nn.BatchNorm1d(7),
        torch.nn.ReLU(),
        torch.nn.Linear(7, 3),
        torch.nn.BatchNorm1d(3),
    ).double()


def test_recomputed_stats_equal_direct_stats_at_x_and_training_state_returns():
    model = make_model()
    opt = sf_torch.AdamWScheduleFree(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        opt.zero_grad()
        model(torch.randn(16, 5, generator=gen, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
    batches = [torch.randn(16, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # direct: a copy holding x; each BN layer's input captured by hooks, statistics by hand
    x_model = make_model()
    with torch.no_grad():
        for p, x in zip(x_model.parameters(), opt.eval_params()):
            p.copy_(x)
    inputs = {1: [], 4: []}
    hooks = [
        x_model[i].register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].clone()))
        for i in inputs
    ]
    x_model.train()
    with torch.no_grad():
        for b in batches:
            x_model(b)
    for h in hooks:
        h.remove()

    opt.eval()
    with sf_torch.recompute_batchnorm_stats(model, batches) as used:
        assert used == 4 and not model.training
        for i, seen in inputs.items():
            mean = torch.stack([s.mean(0) for s in seen]).mean(0)
            var = torch.stack([s.var(0, unbiased=True) for s in seen]).mean(0)
            torch.testing.assert_close(model[i].running_mean, mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(model[i].running_var, var, rtol=1e-12, atol=1e-12)
        x_out = model(batches[0])
    opt.train()
    assert model.training
    after = model.state_dict()
    for k in before:
        if "running" in k or "num_batches" in k:
            assert torch.equal(before[k], after[k]), k
    assert model[1].momentum == 0.1
    # evaluating with the training statistics gives something else: the recompute mattered
    opt.eval()
    model.eval()
    assert not torch.allclose(model(batches[0]), x_out)
