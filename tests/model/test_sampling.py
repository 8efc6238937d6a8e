"""Vectorized per-row sampling on synthetic logits."""

from __future__ import annotations

import pytest
import torch

from services.model.engine.sampling import (
    BatchSampler,
    InvalidSampling,
    RowSampler,
    SamplingConfig,
    draw_step,
)

V = 12


def _rows(*configs: SamplingConfig, vocab: int = V) -> list[RowSampler]:
    return [RowSampler(c, torch.empty(0, dtype=torch.long), vocab) for c in configs]


def _sampler(rows: list[RowSampler], vocab: int = V) -> BatchSampler:
    s = BatchSampler(vocab, "cpu")
    s.set_rows(rows)
    return s


def _logits(batch: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_fast_path_is_argmax() -> None:
    logits = _logits(4)
    s = _sampler(_rows(*[SamplingConfig(temperature=0.0)] * 4))
    assert torch.equal(s.sample(logits), logits.argmax(-1))


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = _logits(3)
    s = _sampler(_rows(SamplingConfig(0.0), SamplingConfig(1.0, seed=1), SamplingConfig(0.0, top_k=3)))
    for _ in range(20):
        out = s.sample(logits)
        assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_one_and_tiny_top_p_are_argmax() -> None:
    logits = _logits(2)
    s = _sampler(_rows(SamplingConfig(1.5, top_k=1, seed=3), SamplingConfig(1.5, top_p=1e-6, seed=4)))
    for _ in range(20):
        assert torch.equal(s.sample(logits), logits.argmax(-1))


def _frequencies(config: SamplingConfig, logits: torch.Tensor, draws: int = 3000) -> torch.Tensor:
    vocab = logits.shape[-1]
    s = _sampler([RowSampler(config, torch.empty(0, dtype=torch.long), vocab)], vocab)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(draws):
        counts[int(s.sample(logits[None])[0])] += 1
    return counts / draws


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    freq = _frequencies(SamplingConfig(0.7, seed=11), logits)
    expected = torch.softmax(logits / 0.7, -1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_top_k_and_top_p_truncate() -> None:
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0])
    top_k = _frequencies(SamplingConfig(1.0, top_k=2, seed=5), logits, 1000)
    assert top_k[2:].sum() == 0 and top_k[:2].min() > 0.2
    probs = torch.softmax(logits, -1)  # 0.46, 0.28, 0.17, ...: top_p 0.8 keeps the first three
    assert probs[:2].sum() < 0.8 < probs[:3].sum()
    top_p = _frequencies(SamplingConfig(1.0, top_p=0.8, seed=6), logits, 1000)
    assert top_p[3:].sum() == 0 and top_p[2] > 0.1


def test_top_p_window_fallback_to_full_sort() -> None:
    vocab = 600  # flat logits: the 256-token window never holds 0.9 of the mass
    logits = torch.zeros(1, vocab)
    s = _sampler(_rows(SamplingConfig(1.0, top_p=0.9, seed=1)), vocab)
    seen = {int(s.sample(logits)[0]) for _ in range(400)}
    assert max(seen) > 300


def test_seeded_rows_do_not_depend_on_companions() -> None:
    vocab = 1000
    target = SamplingConfig(0.9, top_p=0.95, top_k=40, seed=42)
    alone = _sampler([RowSampler(target, torch.empty(0, dtype=torch.long), vocab)], vocab)
    mixed_rows = [
        RowSampler(SamplingConfig(1.0, seed=1), torch.empty(0, dtype=torch.long), vocab),
        RowSampler(target, torch.empty(0, dtype=torch.long), vocab),
        RowSampler(SamplingConfig(0.0), torch.empty(0, dtype=torch.long), vocab),
        RowSampler(SamplingConfig(1.2, top_p=0.5, seed=9), torch.empty(0, dtype=torch.long), vocab),
    ]
    crowd = _sampler(mixed_rows, vocab)
    for step in range(30):
        logits = _logits(4, seed=step, vocab=vocab)
        a = alone.sample(logits[1:2])
        b = crowd.sample(logits)
        assert int(a[0]) == int(b[1])


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    logits = torch.zeros(1, 5000)

    def run(seed: int) -> list[int]:
        s = _sampler([RowSampler(SamplingConfig(1.0, seed=seed), torch.empty(0), 5000)], 5000)
        return [int(s.sample(logits)[0]) for _ in range(10)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_repetition_penalty_hf_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rows = [RowSampler(SamplingConfig(0.0, repetition_penalty=4.0), torch.tensor([0, 1]), 4)]
    s = _sampler(rows, 4)
    # token 0: 2.0 / 4 = 0.5; token 1: -2 * 4 = -8; token 2 (1.0) now wins.
    assert int(s.sample(logits)[0]) == 2
    s.record([2])
    # token 2 seen now: 0.25; token 3 (0.5) ties token 0 (0.5) -> argmax picks the first.
    assert int(s.sample(logits)[0]) == 0


def test_presence_and_frequency_penalties_openai_semantics() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    presence = _sampler(_rows(SamplingConfig(0.0, presence_penalty=1.5), vocab=3), 3)
    assert int(presence.sample(logits)[0]) == 0
    presence.record([0])
    assert int(presence.sample(logits)[0]) == 1  # 3 - 1.5 < 2
    presence.record([1])
    assert int(presence.sample(logits)[0]) == 0  # 1.5 vs 0.5: presence does not grow with count

    frequency = _sampler(_rows(SamplingConfig(0.0, frequency_penalty=0.6), vocab=3), 3)
    out = []
    for _ in range(4):
        tok = frequency.sample(logits)
        frequency.record(tok.tolist())
        out.append(int(tok[0]))
    # counts grow: 3 -> 2.4 -> 1.8 (token 1 at 2.0 wins) -> token 1 1.4 vs token 0 1.8
    assert out == [0, 0, 1, 0]


def test_penalty_state_survives_batch_changes() -> None:
    logits = torch.tensor([[0.0, 0.0, 5.0], [3.0, 2.0, 0.0]])
    pen = RowSampler(SamplingConfig(0.0, frequency_penalty=2.0), torch.empty(0), 3)
    other = RowSampler(SamplingConfig(0.0), torch.empty(0), 3)
    s = _sampler([other, pen], 3)
    s.record(s.sample(logits).tolist())  # pen took token 0 once
    s.set_rows([pen])  # the other row left
    assert int(s.sample(logits[1:])[0]) == 1  # 3 - 2 = 1 < 2


def test_top_p_applies_after_top_k_on_the_renormalised_head() -> None:
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0])
    # Over the whole softmax the third token starts at 0.74 (< 0.78, kept); over the top-3 head at 0.81.
    freq = _frequencies(SamplingConfig(1.0, top_k=3, top_p=0.78, seed=2), logits, 600)
    assert freq[2:].sum() == 0 and freq[1] > 0.2


def test_top_p_head_widens_to_the_whole_vocabulary_per_row() -> None:
    vocab = 10_000
    flat = SamplingConfig(1.0, top_p=0.9, seed=5)
    logits = torch.zeros(3, vocab)
    logits[1, 7] = 30.0  # a peaky companion that fits the first head
    alone = _sampler(_rows(flat, vocab=vocab), vocab)
    crowd = _sampler(
        _rows(flat, SamplingConfig(1.0, top_p=0.5, seed=6), SamplingConfig(0.0), vocab=vocab), vocab
    )
    seen = set()
    for _ in range(50):
        a, b = alone.sample(logits[:1]), crowd.sample(logits)
        assert int(a[0]) == int(b[0])
        assert int(b[1]) == 7
        seen.add(int(a[0]))
    assert max(seen) > 4096


def test_chunked_argmax_and_topk_equal_torch() -> None:
    from services.model.engine.vocab_ops import row_argmax, row_topk

    gen = torch.Generator().manual_seed(0)
    for vocab in (151_936, 70_001, 600):  # divisible by the chunk, ragged, too small to chunk
        x = torch.randn(5, vocab, generator=gen)
        x[1, 77] = x[1, 78] = 50.0  # a tie: the first index wins, as with torch.argmax
        assert torch.equal(row_argmax(x), x.argmax(dim=-1))
        for k in (1, 20, 100):
            vals, ids = row_topk(x, k)
            ref_vals, ref_ids = x.topk(k, dim=-1)
            assert torch.equal(vals, ref_vals)
            assert torch.equal(x.gather(1, ids), ref_vals)
            assert torch.equal(ids[[0, 2, 3, 4]], ref_ids[[0, 2, 3, 4]])


def test_two_level_inverse_cdf_equals_a_flat_cumulative_sum() -> None:
    from services.model.engine.vocab_ops import row_inverse_cdf

    gen = torch.Generator().manual_seed(1)
    for vocab in (151_936, 1000, 7):
        w = torch.rand(4, vocab, generator=gen) ** 8  # uneven weights
        w[0, : vocab // 2] = 0.0
        for _ in range(10):
            u = torch.rand(4, generator=gen)
            cum = w.double().cumsum(-1)
            ref = torch.searchsorted(cum, (u.double()[:, None] * cum[:, -1:]), right=True).reshape(-1)
            got = row_inverse_cdf(w, u)
            # float32 chunk sums vs a float64 running sum: equal but for draws on a boundary
            assert (got == ref).float().mean() >= 0.75
            assert bool((w.gather(1, got[:, None]) > 0).all())


def test_row_values_are_normalised_so_no_batched_tensor_can_overflow() -> None:
    # top_k beyond the vocabulary (even beyond int64) keeps the whole head; seeds reduce mod 2**64.
    rows = _rows(
        SamplingConfig(1.0, top_k=2**64, seed=2**64),
        SamplingConfig(1.0, top_k=-5, seed=-(2**63) - 1),
        SamplingConfig(1.0, top_k=3, seed=-1),
    )
    assert [r.config.top_k for r in rows] == [V, 0, 3]
    assert [r.config.seed for r in rows] == [0, 2**63 - 1, 2**64 - 1]
    s = _sampler(rows)  # raised "Overflow when unpacking long long" before
    assert s.sample(_logits(3)).shape == (3,)
    # Every seed torch accepted keeps its stream: manual_seed(-1) is manual_seed(2**64 - 1).
    same = _rows(SamplingConfig(1.0, seed=-1), SamplingConfig(1.0, seed=2**64 - 1))
    torch_own = torch.Generator().manual_seed(-1)
    assert same[0].draw() == same[1].draw() == float(torch.rand((), generator=torch_own))


def test_non_finite_values_are_refused_for_that_row() -> None:
    for bad in (
        SamplingConfig(float("nan")),
        SamplingConfig(1.0, top_p=float("nan")),
        SamplingConfig(1.0, presence_penalty=float("inf")),
        SamplingConfig(1.0, frequency_penalty=-float("inf")),
        SamplingConfig(1.0, repetition_penalty=0.0),
    ):
        with pytest.raises(InvalidSampling):
            RowSampler(bad, torch.empty(0, dtype=torch.long), V)


def test_given_draws_reproduce_the_step_without_drawing_again() -> None:
    logits = _logits(3)
    configs = (SamplingConfig(1.0, top_k=4, seed=1), SamplingConfig(0.0), SamplingConfig(0.9, seed=2))
    drawing = _sampler(_rows(*configs))
    replaying_rows = _rows(*configs)
    replaying = _sampler(replaying_rows)
    for _ in range(10):
        draws = draw_step(replaying_rows)
        assert draws[1] == 0.0  # greedy rows draw nothing
        expected = drawing.sample(logits)
        assert torch.equal(replaying.sample(logits, draws), expected)
        assert torch.equal(replaying.sample(logits, draws), expected)  # a retry: same tokens, no new draw
