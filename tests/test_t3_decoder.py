"""The static-cache T3 decoder against the library's own transformer and sampler.

The test checkpoint's speech head is zeroed with a bias that leaves 8 live tokens
and the stop token equally likely; checks on logits and greedy tokens use a copy
of T3 whose head is random again, so that a wrong position, mask or weight shows.
"""

import copy
import dataclasses
import gc
import itertools
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import pytest
import torch

from tests.test_model import checkpoint  # noqa: F401
from wyoming_chatterbox.chatterbox.sampling import TURBO_ORDER, logits_processors
from wyoming_chatterbox.chatterbox.t3_decoder import T3Decoder
from wyoming_chatterbox.chatterbox.t3_sampler import draw, param_values, sampler_scores
from wyoming_chatterbox.chatterbox.t3_step import T3Step
from wyoming_chatterbox.speech import Budget, SamplingParams, SynthesisCancelled

pytestmark = pytest.mark.model

GREEDY = SamplingParams(top_k=1)
TEXT = "Hello there, the kitchen light is on."
OTHER_TEXT = "It is twenty one degrees in the living room."


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from threads, and on a shared 2-core box
    OpenMP's spinning threads made these tests 20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Any:  # noqa: F811
    from wyoming_chatterbox.chatterbox.turbo_load import load_turbo_model

    return load_turbo_model(checkpoint, "cpu")


def _random_head(t3: Any, seed: int = 1234) -> Any:
    """A copy of T3 whose speech head gives every token a different logit."""
    t3 = copy.deepcopy(t3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = t3.speech_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.3)
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.3)
    return t3


@pytest.fixture(scope="module")
def rand_t3(model: Any) -> Any:
    return _random_head(model.t3)


@pytest.fixture(scope="module")
def dec(rand_t3: Any) -> Iterator[T3Decoder]:
    decoder = T3Decoder(rand_t3, "cpu", torch.float32)
    yield decoder
    decoder.close()


def _text(model: Any, text: str = TEXT) -> torch.Tensor:
    return model.tokenizer(text, return_tensors="pt").input_ids


def _tokens(generation: Iterable[List[int]]) -> List[int]:
    return [token for block in generation for token in block]


# ---------------------------------------------------------------- forward


def test_forward_matches_hf_transformer(model: Any, rand_t3: Any, dec: Any) -> None:
    """Prefill and 40 forced steps: our logits equal GPT2Model + speech_head with
    its own cache, at every position (past the voice prompt and the text)."""
    text = _text(model)
    forced = torch.randint(0, 6561, (40,), generator=torch.Generator().manual_seed(5))
    ours = dec.forced_logits(dec.prefix(model.conds.t3), text, forced.tolist())

    t3 = rand_t3
    with torch.inference_mode():
        start = torch.full_like(text[:, :1], t3.hp.start_speech_token)
        embeds, _ = t3.prepare_input_embeds(
            t3_cond=dataclasses.replace(model.conds.t3),
            text_tokens=text,
            speech_tokens=start,
        )
        out = t3.tfmr(inputs_embeds=embeds, use_cache=True)
        rows = [t3.speech_head(out[0][:, -1])]
        past = out.past_key_values
        for token in forced:
            out = t3.tfmr(
                inputs_embeds=t3.speech_emb(token.view(1, 1)),
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            rows.append(t3.speech_head(out[0][:, -1]))
        theirs = torch.cat(rows)
    assert ours.shape == theirs.shape == (41, 6563)
    assert ours.std() > 1.0  # a head that tells tokens apart
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_reference_loop(model: Any, rand_t3: Any, dec: Any) -> None:
    """top_k=1: the same tokens as library_loop.LibraryGeneration (the
    library's loop), stop held back and cut included."""
    from wyoming_chatterbox.chatterbox.library_loop import LibraryGeneration

    text = _text(model)
    for params, min_tokens in [(GREEDY, 0), (SamplingParams(top_k=1, top_p=0.5), 5)]:
        reference = LibraryGeneration(
            rand_t3,
            dataclasses.replace(model.conds.t3),
            text,
            params,
            Budget(min_tokens=min_tokens, max_tokens=30),
        )
        expected = _tokens(reference)
        ours = dec.generate(
            dec.prefix(model.conds.t3),
            text,
            params,
            Budget(min_tokens=min_tokens, max_tokens=30),
        )
        assert _tokens(ours) == expected
        assert (ours.cut, ours.n_tokens) == (reference.cut, reference.n_tokens)


def test_prefix_reuse_is_reproducible(model: Any, dec: Any) -> None:
    cond = model.conds.t3
    had_embedding = cond.cond_prompt_speech_emb is not None
    prefix = dec.prefix(cond)
    kept = prefix.kv.clone()
    text = _text(model)
    runs = []
    for fresh in [False, False, True]:
        torch.manual_seed(7)
        use = dec.prefix(cond) if fresh else prefix
        runs.append(
            _tokens(dec.generate(use, text, SamplingParams(), Budget(max_tokens=40)))
        )
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 40  # the random head almost never picks the stop token
    torch.manual_seed(8)
    other = _tokens(dec.generate(prefix, text, SamplingParams(), Budget(max_tokens=40)))
    assert other != runs[0]  # the seed matters: this is sampling
    assert torch.equal(prefix.kv, kept)
    assert (cond.cond_prompt_speech_emb is not None) == had_embedding


# --------------------------------------------------------------- sampling


def _hf_scores(
    logits: torch.Tensor, history: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """The processors as the reference loop builds them."""
    scores = logits.clone()
    for processor in logits_processors(params, TURBO_ORDER):
        scores = processor(history, scores)
    return scores


def _our_scores(
    logits: torch.Tensor, history: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    vocab = logits.size(-1)
    temperature, kth, top_p_cut, penalty = param_values(params, vocab)
    seen = torch.zeros((1, vocab), dtype=torch.bool)
    seen[0, history[0]] = True
    return sampler_scores(
        logits,
        torch.tensor([[temperature]]),
        torch.tensor([[int(kth)]]),
        torch.tensor([[top_p_cut]]),
        torch.tensor([[penalty]]),
        seen,
    )


def test_sampler_distribution_matches_hf_processors() -> None:
    generator = torch.Generator().manual_seed(3)
    vocab = 6563
    history = torch.randint(0, vocab, (1, 30), generator=generator)
    for top_k, top_p, temperature, penalty in itertools.product(
        [1, 5, 50, 1000, 0], [0.5, 0.95, 1.0], [0.3, 0.8, 1.0], [1.0, 1.2, 2.0]
    ):
        logits = torch.randn((1, vocab), generator=generator) * 3
        # Put some history tokens at the top, some of them with negative logits.
        logits[0, history[0, :10]] += 8.0
        logits[0, history[0, 10:12]] = -0.5
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=penalty,
        )
        expected = _hf_scores(logits, history, params).softmax(-1)
        probs = _our_scores(logits, history, params).softmax(-1)
        torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)
        # The draw stays in the support.
        samples = draw(probs.expand(64, vocab).contiguous())
        assert bool((expected[0, samples] > 0).all()), params
        if top_k == 1:
            assert bool((samples == expected.argmax()).all())


def test_draw_is_multinomial() -> None:
    torch.manual_seed(11)
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0, 0.1, 0.025])
    samples = draw(probs.expand(40000, 6).contiguous())
    freq = torch.bincount(samples, minlength=6).float() / 40000
    assert freq[3] == 0
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)


def test_penalty_sees_start_token_first_then_generated(dec: Any) -> None:
    """The seen mask: the start token at step 0, the generated tokens after."""
    with torch.inference_mode():
        row = dec._acquire()
        try:
            pool = dec.pool
            pool.logits[row].zero_()
            pool.logits[row, 100] = 50.0
            pool.temperature[row] = 1.0
            pool.kth[row] = 0
            pool.top_p_cut[row] = -1.0
            pool.penalty[row] = 1.2
            pool.min_tokens[row] = 0
            pool.step[row] = 0
            pool.seen[row] = False
            pool.seen[row, dec.start_token] = True
            pool.active[row] = True
            idx = torch.tensor([row])
            dec.step._sample(pool, idx)
            assert pool.seen[row].nonzero()[:, 0].tolist() == [100]
            pool.logits[row, 100] = -50.0
            pool.logits[row, 200] = 50.0
            dec.step._sample(pool, idx)
            assert pool.seen[row].nonzero()[:, 0].tolist() == [100, 200]
            assert pool.out[row, :2].tolist() == [100, 200]
            assert int(pool.step[row]) == 2
            # A row left out of the step keeps its state, at any step.
            pool.active[row] = False
            pool.logits[row, 300] = 90.0
            dec.step._sample(pool, idx)
            assert pool.seen[row].nonzero()[:, 0].tolist() == [100, 200]
            assert int(pool.step[row]) == 2 and int(pool.token[row]) == 200
            pool.step[row] = 0
            pool.seen[row] = False
            pool.seen[row, dec.start_token] = True
            dec.step._sample(pool, idx)
            assert pool.seen[row].nonzero()[:, 0].tolist() == [dec.start_token]
            assert int(pool.step[row]) == 0 and int(pool.token[row]) == 200
        finally:
            dec._release(row)


# ------------------------------------------------------- stop, min and max


@pytest.fixture(scope="module")
def stop_dec(model: Any) -> Iterator[T3Decoder]:
    """The checkpoint's head (8 live tokens) with the stop token made dominant:
    without min_tokens it stops at once (p = 0.9996 per step)."""
    t3 = copy.deepcopy(model.t3)
    with torch.no_grad():
        t3.speech_head.bias[t3.hp.stop_speech_token] = 10.0
    decoder = T3Decoder(t3, "cpu", torch.float32)
    yield decoder
    decoder.close()


def _live_tokens(model: Any) -> List[int]:
    bias = model.t3.speech_head.bias
    live = (bias > -1).nonzero()[:, 0].tolist()
    return [t for t in live if t != model.t3.hp.stop_speech_token]


def test_stop_token_ends_generation(model: Any) -> None:
    decoder = T3Decoder(model.t3, "cpu", torch.float32)
    prefix = decoder.prefix(model.conds.t3)
    live = set(_live_tokens(model))
    lengths = []
    for seed in range(6):
        torch.manual_seed(seed)
        generation = decoder.generate(
            prefix, _text(model), SamplingParams(), Budget(max_tokens=1000)
        )
        blocks = list(generation)
        tokens = [t for block in blocks for t in block]
        assert not generation.cut
        assert set(tokens) <= live  # no stop token, nothing sampled after it
        assert all(blocks) and len(tokens) == generation.n_tokens
        lengths.append(len(tokens))
    assert max(lengths) < 100 and len(set(lengths)) > 1
    assert decoder.free_slots == 1


def _block_sizes(n: int) -> List[int]:
    """Blocks of sync_every (8) tokens, then the rest; never an empty block."""
    return [8] * (n // 8) + ([n % 8] if n % 8 else [])


def test_min_tokens_holds_the_stop_back(model: Any, stop_dec: Any) -> None:
    prefix = stop_dec.prefix(model.conds.t3)
    for min_tokens in [0, 1, 13, 40]:
        torch.manual_seed(min_tokens)
        generation = stop_dec.generate(
            prefix,
            _text(model),
            SamplingParams(),
            Budget(min_tokens=min_tokens, max_tokens=1000),
        )
        blocks = list(generation)
        assert generation.n_tokens == min_tokens and not generation.cut
        assert [len(b) for b in blocks] == _block_sizes(min_tokens)


def test_max_tokens_cuts(model: Any, stop_dec: Any) -> None:
    prefix = stop_dec.prefix(model.conds.t3)
    for max_tokens in [0, 5, 20]:
        generation = stop_dec.generate(
            prefix,
            _text(model),
            SamplingParams(),
            Budget(min_tokens=1000, max_tokens=max_tokens),
        )
        blocks = list(generation)
        assert generation.cut and generation.n_tokens == max_tokens
        assert [len(b) for b in blocks] == _block_sizes(max_tokens)
    # The stop token on the last allowed step is a stop, not a cut.
    generation = stop_dec.generate(
        prefix, _text(model), SamplingParams(), Budget(min_tokens=4, max_tokens=5)
    )
    assert len(_tokens(generation)) == 4 and not generation.cut


def test_prompt_must_fit(model: Any, rand_t3: Any) -> None:
    small = T3Decoder(rand_t3, "cpu", torch.float32, max_positions=260)
    prefix = small.prefix(model.conds.t3)  # 201 positions in the test voice
    long_text = torch.ones((1, 60), dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit"):
        small.generate(prefix, long_text, GREEDY)
    generation = small.generate(
        prefix, long_text[:, :50], GREEDY, Budget(max_tokens=100)
    )
    assert len(_tokens(generation)) == 260 - (prefix.length + 51)
    assert generation.cut
    with pytest.raises(ValueError, match="another"):
        small.generate(
            T3Decoder(rand_t3, "cpu", torch.float32).prefix(model.conds.t3),
            long_text[:, :5],
            GREEDY,
        )


# ----------------------------------------------------- cancel and slots


def _counting(decoder: T3Decoder, monkeypatch: Any) -> List[int]:
    count = [0]
    run_step = decoder.step.run

    def counted(
        pool: Any, rows: List[int], lengths: List[int], idx: Any = None
    ) -> None:
        count[0] += 1
        run_step(pool, rows, lengths, idx)

    monkeypatch.setattr(decoder.step, "run", counted)
    return count


def test_cancellation(model: Any, dec: Any, monkeypatch: Any) -> None:
    count = _counting(dec, monkeypatch)
    prefix = dec.prefix(model.conds.t3)
    free = dec.free_slots
    for k in [0, 3, 8, 11]:
        count[0] = 0
        generation = dec.generate(
            prefix,
            _text(model),
            GREEDY,
            Budget(lambda: count[0] >= k, min_tokens=1000, max_tokens=1000),
        )
        got: List[int] = []
        with pytest.raises(SynthesisCancelled):
            for block in generation:
                got += block
        assert count[0] == k and len(got) == 8 * (k // 8)
        assert dec.free_slots == max(free, 1)
        assert list(generation) == []


def test_slots_are_reused_and_released(model: Any, rand_t3: Any) -> None:
    decoder = T3Decoder(rand_t3, "cpu", torch.float32)
    prefix = decoder.prefix(model.conds.t3)
    decoder.warm_up()
    assert decoder.free_slots == 1
    first = decoder.generate(prefix, _text(model), GREEDY, Budget(max_tokens=100))
    second = decoder.generate(prefix, _text(model), GREEDY, Budget(max_tokens=100))
    assert decoder.free_slots == 1  # nothing taken before the first block
    next(first), next(second)
    assert decoder.free_slots == 0 and decoder.n_slots == 2
    first.close()
    assert decoder.free_slots == 1
    del second
    gc.collect()
    assert decoder.free_slots == 2
    third = decoder.generate(prefix, _text(model), GREEDY, Budget(max_tokens=10))
    assert len(_tokens(third)) == 10 and decoder.free_slots == 2
    assert decoder.n_slots == 2  # reused, not made anew
    decoder.close()
    with pytest.raises(RuntimeError):
        decoder.generate(prefix, _text(model), GREEDY)


def _other_voice(model: Any) -> Any:
    """A second voice: another speaker embedding and prompt tokens."""
    cond = model.conds.t3
    generator = torch.Generator().manual_seed(9)
    return dataclasses.replace(
        cond,
        speaker_emb=torch.randn(cond.speaker_emb.shape, generator=generator),
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=generator),
        cond_prompt_speech_emb=None,
    )


def test_interleaved_generations_match_solo_runs(model: Any, dec: Any) -> None:
    jobs = [
        (dec.prefix(model.conds.t3), _text(model, TEXT)),
        (dec.prefix(_other_voice(model)), _text(model, OTHER_TEXT)),
    ]
    solo = [_tokens(dec.generate(p, t, GREEDY, Budget(max_tokens=37))) for p, t in jobs]
    assert solo[0] != solo[1]
    generations = [dec.generate(p, t, GREEDY, Budget(max_tokens=37)) for p, t in jobs]
    together: Tuple[List[int], List[int]] = ([], [])
    alive = [True, True]
    while any(alive):
        for i, generation in enumerate(generations):
            if alive[i]:
                try:
                    together[i].extend(next(generation))
                except StopIteration:
                    alive[i] = False
    assert list(together) == solo


# ------------------------------------------------------------ precision


def test_bfloat16_agrees_with_float32_and_releases(
    model: Any, rand_t3: Any, dec: Any
) -> None:
    """Tolerances (measured: 60/60 equal greedy tokens, all 41 forced argmaxes
    equal, logits within 0.006 on a spread of 3.4): greedy tokens agree at
    >= 90% of 60 positions, forced argmax at >= 90%, logits within 0.05."""
    t3 = copy.deepcopy(rand_t3)
    low = T3Decoder(t3, "cpu", torch.bfloat16)
    low.release_reference_weights()
    assert all(p.numel() == 0 for p in t3.tfmr.parameters())
    text = _text(model)
    cond = model.conds.t3
    exact_tokens = _tokens(
        dec.generate(dec.prefix(cond), text, GREEDY, Budget(max_tokens=60))
    )
    low_tokens = _tokens(
        low.generate(low.prefix(cond), text, GREEDY, Budget(max_tokens=60))
    )
    assert len(exact_tokens) == len(low_tokens) == 60
    same = sum(a == b for a, b in zip(exact_tokens, low_tokens))
    assert same >= 54
    forced = exact_tokens[:40]
    exact = dec.forced_logits(dec.prefix(cond), text, forced)
    approx = low.forced_logits(low.prefix(cond), text, forced)
    assert approx.dtype == torch.float32 and low.prefix(cond).kv.dtype == torch.bfloat16
    agree = (exact.argmax(-1) == approx.argmax(-1)).float().mean()
    assert agree >= 0.9
    assert (exact - approx).abs().max() < 0.05
    low.close()


# ------------------------------------------------------------------ CUDA


class _ReplayedStep:
    """A stand-in for a captured CUDA graph on the CPU: replay() runs the body
    the graph would hold (a step over rows [0, n) with no host-known length)."""

    def __init__(self, body: Any) -> None:
        self.body, self.replays = body, 0

    def replay(self) -> None:
        self.replays += 1
        self.body()


def _fake_graphs(decoder: T3Decoder, monkeypatch: Any) -> None:
    """Graphs on the CPU for `decoder`: its step's capture replaced by
    _fake_capture, which needs the decoder to know the rows held."""

    def capture(pool: Any, n: int, span: int) -> _ReplayedStep:
        return _fake_capture(decoder, pool, n, span)

    monkeypatch.setattr(decoder.step, "_capture", capture)
    decoder.cuda_graphs = True


def _fake_capture(decoder: T3Decoder, pool: Any, n: int, span: int) -> _ReplayedStep:
    """What T3Step._capture does to the pool, on the CPU: warm-up steps with
    no row active; and worse junk than that in every row no generation holds."""
    step = decoder.step
    body = step._graph_body(pool, n, span)
    active = pool.active.clone()
    pool.active.zero_()
    for _ in range(2):
        body()
    pool.active.copy_(active)
    generator = torch.Generator().manual_seed(7 + n + span)
    held = set(range(decoder.n_slots)) - set(decoder._free)
    for row in range(pool.capacity):
        if row in held:
            continue
        cache = pool.cache[:, :, row]
        cache.copy_(torch.randn(cache.shape, generator=generator))
        pool.logits[row] = torch.randn(pool.logits[row].shape, generator=generator)
        pool.out[row] = 3
        pool.pos[row] = step.max_positions  # a finished row sits at the end
    return _ReplayedStep(body)


def _record_logits(monkeypatch: Any) -> List[Tuple[List[int], torch.Tensor]]:
    """Each sampling step's active rows and their logits."""
    sample = T3Step._sample
    record: List[Tuple[List[int], torch.Tensor]] = []

    def recording_sample(self: T3Step, pool: Any, idx: Any) -> None:
        active = pool.active[idx]
        record.append((idx[active].tolist(), pool.logits[idx][active].clone()))
        sample(self, pool, idx)

    monkeypatch.setattr(T3Step, "_sample", recording_sample)
    return record


def _per_row(record: List[Tuple[List[int], torch.Tensor]]) -> Dict[int, torch.Tensor]:
    rows: Dict[int, List[torch.Tensor]] = {}
    for step_rows, logits in record:
        for row, row_logits in zip(step_rows, logits):
            rows.setdefault(row, []).append(row_logits)
    return {row: torch.stack(trace) for row, trace in rows.items()}


def test_graph_body_and_capture_protocol_on_the_cpu(
    model: Any, rand_t3: Any, monkeypatch: Any
) -> None:
    """What a CUDA graph replays, run on the CPU: the step with fixed shapes
    (attention over a span of the cache, masked by the position tensor), in a
    pool left dirty the way capture leaves it. The same greedy tokens and
    logits as the eager step with host-known lengths, also when a slot is
    reused by the next generation and when the span grows past a bucket."""
    # This tiny T3's tokens hardly depend on the context, so the logits of
    # every step are compared too: a mask that let a step see the junk past
    # its position would show there.
    record = _record_logits(monkeypatch)
    text, other = _text(model), _text(model, OTHER_TEXT)
    runs, logits = [], []
    for graphs in [False, True]:
        record.clear()
        decoder = T3Decoder(rand_t3, "cpu", torch.float32)
        if graphs:
            _fake_graphs(decoder, monkeypatch)
        prefix = decoder.prefix(model.conds.t3)
        runs.append(
            [
                _tokens(
                    decoder.generate(
                        prefix, text, GREEDY, Budget(min_tokens=30, max_tokens=40)
                    )
                ),
                _tokens(decoder.generate(prefix, other, GREEDY, Budget(max_tokens=25))),
                # Past the first span bucket (256 positions with the prompt).
                _tokens(
                    decoder.generate(
                        prefix, text, GREEDY, Budget(min_tokens=90, max_tokens=90)
                    )
                ),
            ]
        )
        if graphs:
            assert decoder.free_slots == 1  # one slot, reused: its state reset
            graphs_used = decoder.pool.graphs
            assert {key[0] for key in graphs_used} == {1}
            assert len({key[1] for key in graphs_used}) == 2  # two spans
            # Every token came from a replay (blocks of 8 may run past a stop).
            replays = sum(graph.replays for graph in graphs_used.values())
            assert replays >= sum(map(len, runs[-1])) > 0
        logits.append(torch.cat([row_logits for _, row_logits in record]))
        decoder.close()
    assert runs[0] == runs[1]
    assert runs[1][0] == runs[1][2][:40]
    assert logits[0].shape == logits[1].shape
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_a_failed_capture_falls_back_to_the_eager_step(
    model: Any, rand_t3: Any, monkeypatch: Any, caplog: Any
) -> None:
    """Graph capture has never run on every GPU, driver and PyTorch: if it
    fails, the decoder says so once and speaks without graphs."""
    attempts = []

    def failing_capture(self: T3Step, pool: Any, n: int, span: int) -> None:
        attempts.append((n, span))
        body = self._graph_body(pool, n, span)
        active = pool.active.clone()
        pool.active.zero_()
        body()  # the warm-up ran, then the capture broke
        pool.active.copy_(active)
        raise RuntimeError("operation not permitted when stream is capturing")

    text = _text(model)
    plain = T3Decoder(rand_t3, "cpu", torch.float32)
    expected = _tokens(
        plain.generate(
            plain.prefix(model.conds.t3),
            text,
            GREEDY,
            Budget(min_tokens=30, max_tokens=40),
        )
    )
    plain.close()

    monkeypatch.setattr(T3Step, "_capture", failing_capture)
    decoder = T3Decoder(rand_t3, "cpu", torch.float32, max_batch=2)
    decoder.cuda_graphs = True
    with caplog.at_level("WARNING", logger="wyoming_chatterbox.chatterbox.t3_decoder"):
        decoder.warm_up()
    assert "Could not capture" in caplog.text
    assert decoder.cuda_graphs is False
    prefix = decoder.prefix(model.conds.t3)
    first = decoder.generate(prefix, text, GREEDY, Budget(min_tokens=30, max_tokens=40))
    head = next(first)  # holds the warmed-up slot
    second = _tokens(
        decoder.generate(prefix, text, GREEDY, Budget(min_tokens=30, max_tokens=40))
    )
    assert head + _tokens(first) == expected == second
    assert len(attempts) == 1  # tried once, not for each span or batch
    decoder.close()


# ------------------------------------------------------------- batching


def _jobs(model: Any, dec: T3Decoder) -> List[Tuple[Any, torch.Tensor, int, int]]:
    """Three generations: two voices, two texts, different lengths."""
    voice, other = dec.prefix(model.conds.t3), dec.prefix(_other_voice(model))
    return [
        (voice, _text(model, TEXT), 30, 30),
        (other, _text(model, OTHER_TEXT), 53, 53),
        (voice, _text(model, OTHER_TEXT), 0, 41),
    ]


def _interleaved(
    generations: List[Any], order: List[int]
) -> Tuple[List[List[int]], List[List[int]]]:
    """Pull blocks in the given order of generation indices (skipping those
    that ended); returns each one's tokens and its block sizes."""
    tokens: List[List[int]] = [[] for _ in generations]
    blocks: List[List[int]] = [[] for _ in generations]
    for i in itertools.cycle(order):
        if all(g.done for g in generations):
            break
        if generations[i].done:
            continue
        try:
            block = next(generations[i])
        except StopIteration:
            continue
        tokens[i] += block
        blocks[i].append(len(block))
    return tokens, blocks


@pytest.mark.parametrize("graphs", [False, True])
def test_batched_steps_give_each_generation_its_solo_tokens(
    model: Any, rand_t3: Any, monkeypatch: Any, graphs: bool
) -> None:
    """Generations that run together, one step serving several, get the same
    tokens and logits as each alone: on the eager path (each row its own
    attention length) and through the graph body (rows [0, n) side by side,
    some not stepping), while the pool grows from one row to four."""
    record = _record_logits(monkeypatch)
    solo = T3Decoder(rand_t3, "cpu", torch.float32)
    expected, expected_logits = [], []
    for prefix, text, low, high in _jobs(model, solo):
        record.clear()
        expected.append(
            _tokens(
                solo.generate(
                    prefix, text, GREEDY, Budget(min_tokens=low, max_tokens=high)
                )
            )
        )
        expected_logits.append(_per_row(record)[0])
    solo.close()

    record.clear()
    decoder = T3Decoder(rand_t3, "cpu", torch.float32, max_batch=4, lead_tokens=16)
    if graphs:
        _fake_graphs(decoder, monkeypatch)
    generations = [
        decoder.generate(prefix, text, GREEDY, Budget(min_tokens=low, max_tokens=high))
        for prefix, text, low, high in _jobs(model, decoder)
    ]
    first = next(generations[0])  # alone: rows 1 and 2 are made later
    assert decoder.pool.capacity == 1
    tokens, _ = _interleaved(generations, [1, 2, 0, 0, 2])
    tokens[0][:0] = first
    assert tokens == expected
    assert decoder.pool.capacity == 4
    # Companions made tokens in others' steps: fewer blocks ran than if each
    # ran its own (30 + 53 + 41 tokens in blocks of 8: 17).
    assert max(g.batched_steps / g.steps for g in generations) > 1.5
    traces = _per_row(record)
    for row, want in enumerate(expected_logits):
        got = traces[row][: len(want)]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if graphs:
        assert {key[0] for key in decoder.pool.graphs} >= {2, 4}
    assert decoder.free_slots == 3
    decoder.close()


def test_companions_stay_within_their_lead_and_stop_when_told(
    model: Any, dec: Any, rand_t3: Any
) -> None:
    decoder = T3Decoder(rand_t3, "cpu", torch.float32, max_batch=3, lead_tokens=16)
    prefix = decoder.prefix(model.conds.t3)
    stop = [False]
    lead = decoder.generate(
        prefix, _text(model), GREEDY, Budget(min_tokens=100, max_tokens=100)
    )
    behind = decoder.generate(
        prefix,
        _text(model),
        GREEDY,
        Budget(lambda: stop[0], min_tokens=100, max_tokens=100),
    )
    solo = _tokens(
        dec.generate(
            dec.prefix(model.conds.t3),
            _text(model),
            GREEDY,
            Budget(min_tokens=100, max_tokens=100),
        )
    )
    assert next(behind) == solo[:8]  # started: now a companion
    for _ in range(4):
        next(lead)
    # behind went along for two blocks, then was 16 tokens ahead of its reader.
    assert behind.steps == 8 + 16 and lead.steps == 32
    assert next(behind) == solo[8:24]
    stop[0] = True
    next(lead)
    assert behind.steps == 24  # a stopped companion is left out
    with pytest.raises(SynthesisCancelled):
        next(behind)
    assert decoder.free_slots == 1 and lead.steps == 40
    assert _tokens(lead) == solo[40:]
    decoder.close()


def test_cancelling_one_of_a_batch_is_at_once_and_leaves_the_others(
    model: Any, rand_t3: Any, dec: Any, monkeypatch: Any
) -> None:
    decoder = T3Decoder(rand_t3, "cpu", torch.float32, max_batch=2)
    count = _counting(decoder, monkeypatch)
    prefix = decoder.prefix(model.conds.t3)
    solo = _tokens(
        dec.generate(
            dec.prefix(model.conds.t3),
            _text(model),
            GREEDY,
            Budget(min_tokens=60, max_tokens=60),
        )
    )
    other = decoder.generate(
        prefix, _text(model), GREEDY, Budget(min_tokens=60, max_tokens=60)
    )
    assert next(other) == solo[:8]
    count[0] = 0
    gone = decoder.generate(
        prefix,
        _text(model),
        GREEDY,
        Budget(lambda: count[0] >= 11, min_tokens=60, max_tokens=60),
    )
    with pytest.raises(SynthesisCancelled):
        list(gone)
    # 8 steps with other along, then 3 more: the 12th was never run.
    assert count[0] == 11 and other.steps == 8 + 11 and gone.steps == 11
    assert decoder.free_slots == 1
    assert _tokens(other) == solo[8:]
    decoder.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager(model: Any, rand_t3: Any) -> None:
    t3 = copy.deepcopy(rand_t3).to("cuda")
    cond = copy.deepcopy(model.conds.t3).to(device="cuda")
    text = _text(model).to("cuda")
    results = []
    for graphs in [False, True]:
        decoder = T3Decoder(t3, "cuda", torch.float32, cuda_graphs=graphs)
        decoder.warm_up()
        prefix = decoder.prefix(cond)
        results.append(
            [
                _tokens(
                    decoder.generate(
                        prefix, text, GREEDY, Budget(min_tokens=30, max_tokens=60)
                    )
                ),
                _tokens(decoder.generate(prefix, text, GREEDY, Budget(max_tokens=45))),
            ]
        )
        decoder.close()
    assert results[0] == results[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batched_graphs_match_solo_eager(model: Any, rand_t3: Any) -> None:
    """Three generations in shared steps, replayed as graphs over rows [0, n),
    get the tokens each gets alone without graphs."""
    t3 = copy.deepcopy(rand_t3).to("cuda")
    voices = [
        copy.deepcopy(cond).to(device="cuda")
        for cond in (model.conds.t3, _other_voice(model))
    ]
    texts = [_text(model, TEXT).to("cuda"), _text(model, OTHER_TEXT).to("cuda")]
    plan = [(0, 0, 30, 30), (1, 1, 53, 53), (0, 1, 0, 41)]

    def run(decoder: T3Decoder) -> List[List[int]]:
        prefixes = [decoder.prefix(voice) for voice in voices]
        generations = [
            decoder.generate(
                prefixes[v], texts[t], GREEDY, Budget(min_tokens=low, max_tokens=high)
            )
            for v, t, low, high in plan
        ]
        return _interleaved(generations, [0, 1, 2])[0]

    solo = T3Decoder(t3, "cuda", torch.float32, cuda_graphs=False)
    expected = run(solo)
    solo.close()
    decoder = T3Decoder(t3, "cuda", torch.float32, cuda_graphs=True, max_batch=4)
    decoder.warm_up()
    assert run(decoder) == expected
    assert decoder.cuda_graphs and {n for n, _ in decoder.pool.graphs} >= {4}
    decoder.close()
