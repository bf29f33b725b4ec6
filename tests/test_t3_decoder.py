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

from tests.fake_cuda import FakeCuda
from tests.test_model import checkpoint  # noqa: F401
from wyoming_chatterbox.chatterbox import cuda_graphs, t3_step
from wyoming_chatterbox.chatterbox.sampling import TURBO_ORDER, logits_processors
from wyoming_chatterbox.chatterbox.t3_decoder import T3Decoder
from wyoming_chatterbox.chatterbox.t3_sampler import draw, param_values, sampler_scores
from wyoming_chatterbox.chatterbox.t3_slots import SlotPool
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
    from wyoming_chatterbox.chatterbox.turbo import load_turbo_model

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
    owner = object()
    with torch.inference_mode():
        dec._slots.acquire(owner)
        try:
            pool, row = dec._slots.locate(owner)
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
            pool.active[row] = False
            dec._slots.release(owner)


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
    run_step = decoder._run

    def counted(pool: Any, lo: int, hi: int, length: int) -> None:
        count[0] += 1
        run_step(pool, lo, hi, length)

    monkeypatch.setattr(decoder, "_run", counted)
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
    decoder.prepare(graphs=False)  # on a CPU: nothing made ahead
    assert decoder.free_slots == 0 and decoder.n_slots == 0
    first = decoder.generate(prefix, _text(model), GREEDY, Budget(max_tokens=100))
    second = decoder.generate(prefix, _text(model), GREEDY, Budget(max_tokens=100))
    assert decoder.n_slots == 0  # nothing taken before the first block
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


@pytest.fixture
def fake_cuda(monkeypatch: Any) -> FakeCuda:
    """CUDA graphs on the CPU: the capture protocol runs for real, a captured
    graph replays its body (the step over rows [0, n), no host-known length)."""
    fake = FakeCuda()
    monkeypatch.setattr(cuda_graphs, "CUDA", fake)
    return fake


def _with_graphs(decoder: T3Decoder) -> None:
    """prepare() with graphs, then junk in every row (none is held yet):
    what the captures' warm-up runs leave, and worse."""
    decoder.prepare(graphs=True)
    pool = decoder.pool
    assert pool is not None and decoder.cuda_graphs
    generator = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        pool.cache.copy_(torch.randn(pool.cache.shape, generator=generator))
        pool.logits.copy_(torch.randn(pool.logits.shape, generator=generator))
        pool.out.fill_(3)
        pool.pos.fill_(decoder.max_positions)  # a finished row sits at the end


def _replayed(decoder: T3Decoder, monkeypatch: Any) -> List[Tuple[int, int]]:
    """The (rows, span) of every graph the decoder replays."""
    graphs = decoder.graphs
    assert graphs is not None
    replay = graphs.replay
    calls: List[Tuple[int, int]] = []

    def recorded(n: int, span: int) -> bool:
        calls.append((n, span))
        return replay(n, span)

    monkeypatch.setattr(graphs, "replay", recorded)
    return calls


def _record_logits(
    monkeypatch: Any, key: Any = None
) -> List[Tuple[List[int], torch.Tensor]]:
    """Each sampling step's active rows (or key(row): who holds it, as rows
    may move) and their logits."""
    sample = T3Step._sample
    record: List[Tuple[List[int], torch.Tensor]] = []

    def recording_sample(self: T3Step, pool: Any, idx: Any) -> None:
        active = pool.active[idx]
        rows = idx[active].tolist()
        keys = rows if key is None else [key(row) for row in rows]
        record.append((keys, pool.logits[idx][active].clone()))
        sample(self, pool, idx)

    monkeypatch.setattr(T3Step, "_sample", recording_sample)
    return record


def _per_row(record: List[Tuple[List[int], torch.Tensor]]) -> Dict[int, torch.Tensor]:
    rows: Dict[int, List[torch.Tensor]] = {}
    for step_rows, logits in record:
        for row, row_logits in zip(step_rows, logits):
            rows.setdefault(row, []).append(row_logits)
    return {row: torch.stack(trace) for row, trace in rows.items()}


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_the_graph_body_has_no_host_sync_and_no_data_dependent_op(
    rand_t3: Any, n: int, monkeypatch: Any
) -> None:
    """The step a CUDA graph holds, on the meta device (shapes, no data): a
    host read (.item(), .tolist(), `if tensor`) or an op whose output shape
    depends on the data (nonzero, a boolean mask) raises there, as it would
    break a capture on a GPU."""
    step = T3Step(rand_t3, "meta", torch.bfloat16)
    pool = SlotPool(step, 16)
    for span in (step.spans[0], step.spans[-1]):
        step.graph_body(pool, n, span)()
    # The check sees such an op: a sampler that picks its token by a mask.
    monkeypatch.setattr(t3_step, "draw", lambda p: (p > 0).nonzero()[: p.size(0), 1])
    with pytest.raises(NotImplementedError, match="nonzero"):
        step.graph_body(pool, n, step.spans[0])()


def test_graph_body_and_capture_protocol_on_the_cpu(
    model: Any, rand_t3: Any, monkeypatch: Any, fake_cuda: FakeCuda
) -> None:
    """What the CUDA graphs replay, run on the CPU: the step with fixed shapes
    (attention over a span of the cache, masked by the position tensor), in a
    pool left dirty. The same greedy tokens and logits as the eager step,
    also when a slot is reused by the next generation and when the span grows
    past a bucket."""
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
            _with_graphs(decoder)
            replayed = _replayed(decoder, monkeypatch)
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
            assert {n for n, _ in replayed} == {1}
            assert len({span for _, span in replayed}) == 2  # two spans
            # Every token came from a replay (blocks of 8 may run past a stop).
            assert len(fake_cuda.replays) == len(replayed)
            assert len(replayed) >= sum(map(len, runs[-1])) > 0
        logits.append(torch.cat([row_logits for _, row_logits in record]))
        decoder.close()
    assert runs[0] == runs[1]
    assert runs[1][0] == runs[1][2][:40]
    assert logits[0].shape == logits[1].shape
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_graphs_are_captured_at_once_on_the_decoders_own_gpu(
    fake_cuda: FakeCuda,
) -> None:
    """Every graph in one go: under a guard for the decoder's device (cuda:1,
    not the current GPU 0), on one capture stream made on that device, into
    one shared memory pool, one warm-up run each, and no synchronize per
    capture. Replays run under the same guard; the thread's stream and
    device are restored."""
    device = torch.device("cuda", 1)
    ran: List[Tuple[int, int, Any, Any]] = []

    def body_for(n: int, span: int) -> Any:
        return lambda: ran.append((n, span, fake_cuda.current_device, fake_cuda.stream))

    graphs = cuda_graphs.capture_steps(body_for, [1, 2, 4], [256, 512], device)
    assert graphs.keys() == [(n, s) for n in (1, 2, 4) for s in (256, 512)]
    begins = [e for e in fake_cuda.events if e[0] == "capture_begin"]
    assert len(begins) == 6 and len(fake_cuda.pools) == 1
    assert {(e[1], e[2]) for e in begins} == {(1, "s1")}
    assert all(e[3]["pool"] is fake_cuda.pools[0] for e in begins)
    assert fake_cuda.names().count("synchronize") == 2  # before and after all
    assert len(ran) == 12  # a warm-up run and the captured one, each
    assert {(device_, stream.name) for _, _, device_, stream in ran} == {(1, "s1")}
    assert fake_cuda.current_device is None and fake_cuda.stream is None
    ran.clear()
    assert graphs.replay(2, 512) and not graphs.replay(8, 512)
    assert ran == [(2, 512, 1, None)]
    assert graphs.seconds >= 0 and graphs.memory == 6000


def test_a_failed_capture_is_cleaned_up_and_the_eager_step_samples(
    model: Any, rand_t3: Any, fake_cuda: FakeCuda
) -> None:
    """torch.cuda.graph's __exit__ raises inside capture_end when a capture
    was invalidated, leaving the default generator in capture mode (then
    every eager draw fails) and the allocator routing to the graph's pool.
    Here the third capture_end raises: the stream and device are restored,
    the routing to the shared pool is ended on the decoder's GPU, a capture
    that completes takes the generator out of capture mode, eager draws are
    tried, and the decoder samples eagerly: the tokens of one that never
    tried graphs, from the same seed."""
    text = _text(model)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)

    def sampled(decoder: T3Decoder) -> List[int]:
        torch.manual_seed(5)
        prefix = decoder.prefix(model.conds.t3)
        return _tokens(decoder.generate(prefix, text, params, Budget(max_tokens=24)))

    plain = T3Decoder(rand_t3, "cpu", torch.float32)
    expected = sampled(plain)
    plain.close()

    fake_cuda.fail_after = 2
    decoder = T3Decoder(rand_t3, "cpu", torch.float32, max_batch=2)
    with pytest.raises(cuda_graphs.CaptureFailed, match="during capture"):
        decoder.prepare(graphs=True)
    assert decoder.graphs is None
    names = fake_cuda.names()
    at = names.index("end_allocate_to_pool")
    assert names[:at].count("capture_begin") == 3
    assert fake_cuda.events[at][3] == {"index": 0, "pool": fake_cuda.pools[0]}
    # The recovery's own capture, on the decoder's GPU and a stream of its own.
    assert names[at + 1 :] == ["capture_begin", "capture_end", "random_draws"]
    assert fake_cuda.events[at + 1][1] == 0 and fake_cuda.events[at + 1][2] != "s1"
    assert not fake_cuda.generator_capturing
    assert fake_cuda.current_device is None and fake_cuda.stream is None
    assert sampled(decoder) == expected
    assert len(set(expected)) > 3  # sampled, not a constant
    decoder.close()


def test_recovery_that_leaves_draws_broken_says_so(fake_cuda: FakeCuda) -> None:
    """If the generator stayed in capture mode after all, the capture
    failure is an error: nothing could be spoken."""
    fake_cuda.fail_next_end = 2  # the graph's capture_end, then the recovery's
    body = lambda: None  # noqa: E731
    with pytest.raises(RuntimeError, match="unable to draw random numbers"):
        cuda_graphs.capture_steps(lambda n, s: body, [1], [256], torch.device("cpu"))


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
    model: Any, rand_t3: Any, monkeypatch: Any, graphs: bool, fake_cuda: FakeCuda
) -> None:
    """Generations that run together, one step serving several, get the same
    tokens and logits as each alone: on the eager path (rows side by side,
    each masked to its own length; the pool grows from one row to four) and
    through the graph body (rows [0, n), some not stepping, generations
    moved to lower rows as others end)."""
    held: Dict[int, int] = {}  # id(member) -> generation, once batched
    batched: List[T3Decoder] = []

    def holder(row: int) -> int:
        if not batched:
            return row
        return held[id(batched[0]._slots._owner[row])]

    record = _record_logits(monkeypatch, key=holder)
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
        _with_graphs(decoder)
        replayed = _replayed(decoder, monkeypatch)
    generations = [
        decoder.generate(prefix, text, GREEDY, Budget(min_tokens=low, max_tokens=high))
        for prefix, text, low, high in _jobs(model, decoder)
    ]
    held.update({id(g._member): i for i, g in enumerate(generations)})
    batched.append(decoder)
    first = next(generations[0])  # alone: rows 1 and 2 are made later
    assert decoder.pool.capacity == (4 if graphs else 1)
    tokens, _ = _interleaved(generations, [1, 2, 0, 0, 2])
    tokens[0][:0] = first
    assert tokens == expected
    assert decoder.pool.capacity == 4
    # Companions made tokens in others' steps: fewer blocks ran than if each
    # ran its own (30 + 53 + 41 tokens in blocks of 8: 17).
    assert max(g.batched_steps / g.steps for g in generations) > 1.5
    traces = _per_row(record)
    for i, want in enumerate(expected_logits):
        got = traces[i][: len(want)]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if graphs:
        assert {n for n, _ in replayed} >= {1, 2, 4}
    assert decoder.free_slots == (4 if graphs else 3)
    decoder.close()


def test_a_group_left_alone_runs_at_batch_1(
    model: Any, rand_t3: Any, monkeypatch: Any, fake_cuda: FakeCuda
) -> None:
    """Three groups step together over rows [0, 4); once the first two have
    ended, the third (in row 2) is moved to row 0 and its steps replay the
    one-row graph, not the four-row one, with the tokens it gets alone."""
    jobs = [(TEXT, 8), (OTHER_TEXT, 8), (TEXT, 40)]
    solo = T3Decoder(rand_t3, "cpu", torch.float32)
    alone = _tokens(
        solo.generate(
            solo.prefix(model.conds.t3),
            _text(model, TEXT),
            GREEDY,
            Budget(min_tokens=40, max_tokens=40),
        )
    )
    solo.close()
    decoder = T3Decoder(rand_t3, "cpu", torch.float32, max_batch=4)
    _with_graphs(decoder)
    replayed = _replayed(decoder, monkeypatch)
    prefix = decoder.prefix(model.conds.t3)
    generations = [
        decoder.generate(
            prefix, _text(model, text), GREEDY, Budget(min_tokens=n, max_tokens=n)
        )
        for text, n in jobs
    ]
    for generation in generations:
        generation.start()  # rows 0, 1 and 2
    last = generations[2]
    tokens = next(last)  # one block, all three in it: they end
    assert [n for n, _ in replayed] == [4] * 8
    assert all(g.steps == 8 for g in generations)
    replayed.clear()
    for generation in generations[:2]:
        assert len(_tokens(generation)) == 8
    tokens += _tokens(last)
    assert tokens == alone
    assert [n for n, _ in replayed] == [1] * 32
    decoder.close()


def test_more_groups_than_a_step_serves_wait_beside_it(
    model: Any, rand_t3: Any, monkeypatch: Any, fake_cuda: FakeCuda
) -> None:
    """A step serves two rows (graphs captured for them); a third group is
    held in a parking row and moved in for its own steps: each gets its solo
    tokens, and the step pool (and its graphs) stay as captured."""
    solo = T3Decoder(rand_t3, "cpu", torch.float32)
    expected = [
        _tokens(
            solo.generate(prefix, text, GREEDY, Budget(min_tokens=low, max_tokens=high))
        )
        for prefix, text, low, high in _jobs(model, solo)
    ]
    solo.close()
    decoder = T3Decoder(rand_t3, "cpu", torch.float32, max_batch=2, lead_tokens=16)
    _with_graphs(decoder)
    pool, graphs = decoder.pool, decoder.graphs
    replayed = _replayed(decoder, monkeypatch)
    generations = [
        decoder.generate(prefix, text, GREEDY, Budget(min_tokens=low, max_tokens=high))
        for prefix, text, low, high in _jobs(model, decoder)
    ]
    for generation in generations:
        generation.start()
    assert decoder.n_slots == 3 and decoder.pool is pool
    tokens, _ = _interleaved(generations, [2, 0, 1, 2])
    assert tokens == expected
    assert decoder.pool is pool and decoder.graphs is graphs
    assert {n for n, _ in replayed} <= {1, 2}
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
        decoder = T3Decoder(t3, "cuda", torch.float32)
        decoder.prepare(graphs=graphs)
        assert decoder.cuda_graphs == graphs
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

    solo = T3Decoder(t3, "cuda", torch.float32)
    expected = run(solo)
    solo.close()
    decoder = T3Decoder(t3, "cuda", torch.float32, max_batch=4)
    decoder.prepare(graphs=True)
    assert run(decoder) == expected
    assert decoder.cuda_graphs and {n for n, _ in decoder.graphs.keys()} == {1, 2, 4}
    decoder.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_steps_never_synchronize(model: Any, rand_t3: Any, dtype: Any) -> None:
    """The steps between two reads of the tokens, replayed or eager, under
    torch.cuda.set_sync_debug_mode("error"): any host sync there raises."""
    t3 = copy.deepcopy(rand_t3).to("cuda")
    decoder = T3Decoder(t3, "cuda", dtype, max_batch=4)
    decoder.prepare(graphs=True)
    generation = decoder.generate(
        decoder.prefix(copy.deepcopy(model.conds.t3).to(device="cuda")),
        _text(model).to("cuda"),
        SamplingParams(),
        Budget(min_tokens=40, max_tokens=40),
    )
    generation.start()
    pool = decoder.pool
    assert pool is not None and decoder.graphs is not None
    pool.active[0] = True
    length = int(pool.pos[0]) + 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n in range(8):
            decoder._run(pool, 0, 1, length + n)
            decoder.step.eager(pool, 0, 2, length + 8 + n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    pool.active[0] = False
    generation.close()
    decoder.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_a_failed_capture_leaves_cuda_working(
    model: Any, rand_t3: Any, monkeypatch: Any
) -> None:
    """A real invalidated capture (a host read inside it): after recovery the
    thread is back on its own stream, nothing captures, eager draws and
    S3Gen-style noise work, the decoder samples what a decoder that never
    tried graphs samples, and a later capture succeeds."""
    t3 = copy.deepcopy(rand_t3).to("cuda")
    cond = copy.deepcopy(model.conds.t3).to(device="cuda")
    text = _text(model).to("cuda")
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)

    def sampled(decoder: T3Decoder) -> List[int]:
        torch.manual_seed(3)
        prefix = decoder.prefix(cond)
        return _tokens(decoder.generate(prefix, text, params, Budget(max_tokens=24)))

    plain = T3Decoder(t3, "cuda", torch.float32)
    expected = sampled(plain)
    plain.close()
    body = T3Step.graph_body

    def syncing_body(self: T3Step, pool: Any, n: int, span: int) -> Any:
        step = body(self, pool, n, span)
        return lambda: (step(), int(pool.pos[0]))

    monkeypatch.setattr(T3Step, "graph_body", syncing_body)
    stream = torch.cuda.current_stream()
    decoder = T3Decoder(t3, "cuda", torch.float32, max_batch=2)
    with pytest.raises(cuda_graphs.CaptureFailed):
        decoder.prepare(graphs=True)
    assert torch.cuda.current_stream() == stream
    assert not torch.cuda.is_current_stream_capturing()
    torch.randn(16, device="cuda").exponential_()
    assert sampled(decoder) == expected
    decoder.close()
    monkeypatch.setattr(T3Step, "graph_body", body)
    again = T3Decoder(t3, "cuda", torch.float32)
    again.prepare(graphs=True)
    assert again.cuda_graphs and sampled(again) == expected
    again.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_graphs_on_the_second_gpu_match_eager(model: Any, rand_t3: Any) -> None:
    t3 = copy.deepcopy(rand_t3).to("cuda:1")
    cond = copy.deepcopy(model.conds.t3).to(device="cuda:1")
    text = _text(model).to("cuda:1")
    results = []
    for graphs in [False, True]:
        decoder = T3Decoder(t3, "cuda:1", torch.float32)
        decoder.prepare(graphs=graphs)
        prefix = decoder.prefix(cond)
        budget = Budget(min_tokens=30, max_tokens=60)
        results.append(_tokens(decoder.generate(prefix, text, GREEDY, budget)))
        decoder.close()
    assert results[0] == results[1] and len(set(results[0])) > 1
