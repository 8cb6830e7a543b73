"""The exact neighbour search over several blocks of queries equals one full top-k (torch's)."""
import torch
import torch.nn.functional as F

from cvrecipe.data import neardup as N


def test_knn_over_several_blocks_equals_one_topk(monkeypatch):
    monkeypatch.setattr(N, "BLOCK", 16)  # 50 queries: 4 blocks, the last one short
    x = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    sims, idx = N.knn(x, x, 5, self_offset=0)
    full = x @ x.T
    full.fill_diagonal_(-2.0)  # an image is not its own neighbour
    top = full.topk(5, dim=1)
    torch.testing.assert_close(sims, top.values)
    assert torch.equal(idx, top.indices)
    assert (idx != torch.arange(50)[:, None]).all()
