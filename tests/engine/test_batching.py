"""Batching schedulers: every request gets the plain decoder's greedy tokens, whatever the scheduler and load."""
from collections import Counter

import pandas as pd
import pytest
import torch

from llmopt.bench import workload
from llmopt.engine import batching
from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.testing import tiny_model
from llmopt.errors import InvalidParameterError


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model, run on one thread: its ops are too small to gain from more, and on a shared
    machine extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model("llama", seed=3)
    torch.set_num_threads(threads)


def reference_tokens(model, requests, eos):
    """Each request alone through the plain decoder (batch 1, static cache), memoized on (prompt, cap)."""
    decoder = Decoder(model, None, cache="static", eos_token_ids=eos)
    memo = {}
    for r in requests:
        key = (r.prompt_ids, r.max_new_tokens)
        if key not in memo:
            config = GenerationConfig(max_new_tokens=r.max_new_tokens)
            memo[key] = decoder.generate(list(r.prompt_ids), config).token_ids
    return {r.request_id: memo[(r.prompt_ids, r.max_new_tokens)] for r in requests}


def frequent_token(model, requests):
    """A token greedy decoding often produces mid-answer: used as EOS so some requests stop early."""
    tokens = reference_tokens(model, requests, eos=[])
    counts = Counter(t for ids in tokens.values() for t in ids[1:-1])
    return counts.most_common(1)[0][0]


@pytest.fixture(scope="module")
def mixed(tiny):
    pool = workload.random_pool(tiny.config.vocab_size, n_prompts=24, min_tokens=1, max_tokens=40, seed=5)
    wl = workload.make_workload(pool, 14, seed=2, min_new_tokens=1, max_new_tokens=16)
    eos = [frequent_token(tiny, wl.requests)]
    return wl, eos, reference_tokens(tiny, wl.requests, eos)


@pytest.mark.parametrize("scheduler", batching.SCHEDULERS)
def test_every_scheduler_gives_the_plain_decoders_tokens(tiny, mixed, scheduler):
    wl, eos, expected = mixed
    result = batching.run(scheduler, tiny, wl.requests, max_batch=4, timeout_ms=5, eos_token_ids=eos)
    assert result.tokens == expected
    reasons = Counter(r.finish_reason for r in result.records)
    assert reasons["eos"] > 0 and reasons["length"] > 0, "the workload must mix early EOS and full-length answers"
    assert all(r.completions == 1 for r in result.records)


def test_records_and_token_accounting(tiny, mixed):
    wl, eos, expected = mixed
    prompt_tokens = sum(len(r.prompt_ids) for r in wl.requests)
    useful = prompt_tokens + sum(len(t) - 1 for t in expected.values())
    for scheduler in batching.SCHEDULERS:
        result = batching.run(scheduler, tiny, wl.requests, max_batch=4, timeout_ms=5, eos_token_ids=eos)
        stats = result.stats()
        assert stats["useful_tokens"] == useful, scheduler
        assert stats["generated_tokens"] == sum(len(t) for t in expected.values())
        assert 0 < stats["busy_fraction"] <= 1
        for r in result.records:
            assert r.arrival_s <= r.start_s <= r.first_token_s <= r.last_token_s <= r.finish_s, (scheduler, r)
        if scheduler in ("sequential", "continuous"):  # continuous packs its joiners' prompts: no padding either
            assert stats["padded_tokens"] == 0 and stats["computed_tokens"] == useful
        else:  # mixed prompt and answer lengths: padded tokens are computed and counted
            assert stats["padded_tokens"] > 0 and stats["computed_tokens"] == useful + stats["padded_tokens"]
        if scheduler == "continuous":
            assert 1 < stats["mean_decode_rows"] <= 4


def test_requests_are_not_served_before_they_arrive(tiny):
    pool = workload.random_pool(tiny.config.vocab_size, 8, 2, 10, seed=1)
    wl = workload.make_workload(pool, 12, seed=4, arrival="poisson", rate_per_s=100, min_new_tokens=2,
                                max_new_tokens=6)
    expected = reference_tokens(tiny, wl.requests, eos=[])
    for scheduler in batching.SCHEDULERS:
        result = batching.run(scheduler, tiny, wl.requests, max_batch=3, timeout_ms=10, eos_token_ids=[])
        assert result.tokens == expected
        assert all(r.start_s >= r.arrival_s for r in result.records)
        assert result.wall_s >= max(r.arrival_s for r in wl.requests)


@pytest.mark.parametrize("scheduler", ["static", "dynamic"])
def test_batch_timeout_and_full_batch(tiny, scheduler):
    pool = workload.random_pool(tiny.config.vocab_size, 4, 3, 6, seed=0)
    wl = workload.make_workload(pool, 2, seed=0, min_new_tokens=2, max_new_tokens=2)
    waited = batching.run(scheduler, tiny, wl.requests, max_batch=4, timeout_ms=150, eos_token_ids=[])
    assert all(r.start_s >= 0.15 for r in waited.records), "a batch that is not full waits for the timeout"
    full = batching.run(scheduler, tiny, wl.requests, max_batch=2, timeout_ms=150, eos_token_ids=[])
    assert all(r.start_s < 0.15 for r in full.records), "a full batch leaves at once"


def test_static_waits_a_new_window_for_a_backlog_but_dynamic_does_not(tiny):
    pool = workload.random_pool(tiny.config.vocab_size, 4, 3, 6, seed=0)
    wl = workload.make_workload(pool, 3, seed=0, min_new_tokens=2, max_new_tokens=2)
    # batches of 2: the third request is queued from t=0, so it has waited longer than the timeout when the
    # first batch ends; dynamic serves it at once, static opens a new window of timeout_ms first.
    static = batching.run("static", tiny, wl.requests, max_batch=2, timeout_ms=200, eos_token_ids=[])
    dynamic = batching.run("dynamic", tiny, wl.requests, max_batch=2, timeout_ms=200, eos_token_ids=[])
    first_batch_end = max(r.finish_s for r in static.records if r.request_id < 2)
    assert static.records[2].start_s >= first_batch_end + 0.2
    assert dynamic.records[2].start_s >= 0.2 and dynamic.records[2].start_s < static.records[2].start_s


@pytest.mark.slow
@pytest.mark.timeout(120)  # a hang guard, not a speed test
def test_continuous_load_of_1000_poisson_requests(tiny):
    pool = workload.random_pool(tiny.config.vocab_size, n_prompts=40, min_tokens=1, max_tokens=12, seed=7)
    wl = workload.make_workload(pool, 1000, seed=11, arrival="poisson", rate_per_s=4000, min_new_tokens=1,
                                max_new_tokens=6)
    eos = [frequent_token(tiny, wl.requests[:100])]
    expected = reference_tokens(tiny, wl.requests, eos)
    result = batching.run("continuous", tiny, wl.requests, max_batch=16, eos_token_ids=eos)
    ids = [r.request_id for r in result.records]
    assert sorted(ids) == list(range(1000)), "a request was lost or duplicated"
    assert all(r.completions == 1 for r in result.records), "every request is answered exactly once"
    assert result.tokens == expected
    assert Counter(r.finish_reason for r in result.records)["eos"] > 0
    assert result.stats()["mean_decode_rows"] > 2, "under this load sequences must share decode steps"


def test_slot_cache_rows_write_at_their_own_lengths(tiny):
    cfg = tiny.config
    slots = batching.SlotCache(cfg, max_batch=3, max_length=8)
    for slot, n in enumerate([2, 5, 3]):
        view = slots.prefill_view(slot)
        for layer in range(cfg.num_layers):
            k = torch.full((1, cfg.num_kv_heads, n, cfg.head_dim), float(slot + 1))
            view.update(layer, k, k)
    positions, mask = slots.begin_decode(3)
    assert positions[:, 0].tolist() == [2, 5, 3]
    assert mask.shape == (3, 1, 1, 6) and mask[:, 0, 0].sum(-1).tolist() == [3, 6, 4]
    new = torch.full((3, cfg.num_kv_heads, 1, cfg.head_dim), 9.0)
    keys, _ = slots.update(0, new, new)
    assert keys.shape[2] == 6 and keys[0, 0, 2, 0] == 9 and keys[1, 0, 5, 0] == 9 and keys[2, 0, 3, 0] == 9
    assert keys[0, 0, 1, 0] == 1 and keys[2, 0, 2, 0] == 3
    slots.move(2, 0)
    assert slots.lengths[0] == 3 and slots.keys[0][0, 0, 2, 0] == 3


def test_mixed_step_equals_a_decode_step_and_a_separate_prefill(tiny):
    """Rows' decode step and joiners' prefill in one forward: the same logits and cache as running them apart."""
    cfg = tiny.config
    gen = torch.Generator().manual_seed(0)
    held = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 7)]  # running rows
    joiners = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 1, 4)]
    last = [11, 42]

    def running_slots():
        slots = batching.SlotCache(cfg, max_batch=5, max_length=16)
        with torch.inference_mode():
            for slot, prompt in enumerate(held):
                tiny(torch.tensor([prompt]), torch.arange(len(prompt)), slots.prefill_view(slot), last_only=True)
        return slots

    apart = running_slots()
    with torch.inference_mode():
        positions, mask = apart.begin_decode(2)
        decode_logits = tiny(torch.tensor(last)[:, None], positions, apart, mask, last_only=True)[:, -1]
        apart.end_decode()
        prefill_logits = [tiny(torch.tensor([p]), torch.arange(len(p)), apart.prefill_view(2 + j),
                               last_only=True)[0, -1] for j, p in enumerate(joiners)]
    together = running_slots()
    view = batching._SlotMixedStep(together, 2, [len(p) for p in joiners])
    tokens = torch.tensor([last + [t for p in joiners for t in p]])
    with torch.inference_mode():
        logits = tiny(tokens, view.positions, view, view.mask, logits_at=view.logits_at)[0]
    view.finish()
    torch.testing.assert_close(logits[:2], decode_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[2:], torch.stack(prefill_logits), rtol=1e-4, atol=1e-5)
    assert together.lengths == apart.lengths == [4, 8, 5, 1, 4]
    for layer in range(cfg.num_layers):
        for slot, n in enumerate(together.lengths):
            torch.testing.assert_close(together.keys[layer][slot, :, :n], apart.keys[layer][slot, :, :n],
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(together.values[layer][slot, :, :n], apart.values[layer][slot, :, :n],
                                       rtol=1e-4, atol=1e-5)


def test_continuous_with_and_without_mixed_steps(tiny, mixed):
    wl, eos, expected = mixed
    with_mixed = batching.run("continuous", tiny, wl.requests, max_batch=3, eos_token_ids=eos)
    alone = batching.run("continuous", tiny, wl.requests, max_batch=3, eos_token_ids=eos, mixed_steps=False)
    assert with_mixed.tokens == alone.tokens == expected
    assert with_mixed.mixed_steps > 0 and with_mixed.mixed_rows >= with_mixed.mixed_steps
    assert alone.mixed_steps == 0
    # a mixed step replaces a prefill call plus a decode step: fewer forwards for the same tokens
    assert with_mixed.forward_calls < alone.forward_calls


def test_grouped_joins_wait_for_several_free_slots(tiny, mixed):
    """join_batch > 1: joins of at least min(join_batch, queued) requests, same tokens; join_wait_steps bounds the
    wait (0: the default schedule exactly)."""
    wl, eos, expected = mixed  # a burst: all 14 requests queued at t = 0
    default = batching.run("continuous", tiny, wl.requests, max_batch=4, eos_token_ids=eos)
    grouped = batching.run("continuous", tiny, wl.requests, max_batch=4, eos_token_ids=eos, join_batch=3,
                           join_wait_steps=1000)
    assert default.tokens == grouped.tokens == expected
    assert all(r.completions == 1 for r in grouped.records)

    def join_sizes(result):  # requests admitted in one step share their start time
        return [n for _, n in sorted(Counter(r.start_s for r in result.records).items())]

    queued, sizes = len(wl.requests), join_sizes(grouped)
    for n in sizes:
        assert n >= min(3, queued)
        queued -= n
    assert min(join_sizes(default)) == 1, "the default admits single requests as slots free"
    assert grouped.held_steps > 0 and default.held_steps == 0 and len(sizes) < len(join_sizes(default))
    unheld = batching.run("continuous", tiny, wl.requests, max_batch=4, eos_token_ids=eos, join_batch=3,
                          join_wait_steps=0)
    assert unheld.held_steps == 0 and join_sizes(unheld) == join_sizes(default) and unheld.tokens == expected
    short_wait = batching.run("continuous", tiny, wl.requests, max_batch=4, eos_token_ids=eos, join_batch=4,
                              join_wait_steps=1)
    assert short_wait.tokens == expected and short_wait.held_steps > 0


def test_bad_input_raises_readable_errors(tiny):
    pool = workload.random_pool(tiny.config.vocab_size, 2, 2, 3)
    requests = workload.make_workload(pool, 2).requests
    with pytest.raises(InvalidParameterError):
        batching.run("fifo", tiny, requests)
    with pytest.raises(InvalidParameterError):
        batching.run("static", tiny, requests, max_batch=0)
    with pytest.raises(InvalidParameterError):
        batching.run("static", tiny, requests + requests[:1])
    with pytest.raises(InvalidParameterError):
        workload.make_workload(pool, 3, arrival="poisson")
    for options in ({"join_batch": 0}, {"join_wait_steps": -1}):
        with pytest.raises(InvalidParameterError, match="join_batch"):
            batching.run("continuous", tiny, requests, **options)


def test_workload_is_seeded_and_mixed():
    pool = workload.random_pool(96, 10, 2, 30, seed=0)
    a = workload.make_workload(pool, 50, seed=3, arrival="poisson", rate_per_s=10)
    b = workload.make_workload(pool, 50, seed=3, arrival="poisson", rate_per_s=10)
    assert a.frame().equals(b.frame())
    frame = a.frame()
    assert frame.arrival_s.is_monotonic_increasing and frame.arrival_s.iloc[0] > 0
    assert frame.max_new_tokens.min() >= 4 and frame.max_new_tokens.max() <= 32
    assert frame.max_new_tokens.nunique() > 5 and frame.prompt_tokens.nunique() > 3
    assert 2 < 50 / frame.arrival_s.iloc[-1] < 50  # about 10 requests per second
    burst = workload.make_workload(pool, 80, seed=3)
    assert [(r.prompt_ids, r.max_new_tokens) for r in a.requests] == \
        [(r.prompt_ids, r.max_new_tokens) for r in burst.requests[:50]], "same seed: same prompts and caps"
    longer = workload.with_answer_lengths(pool, 50, 3, [[40, 60]])["burst, answers 40-60"]
    assert [r.prompt_ids for r in longer.requests] == [r.prompt_ids for r in a.requests], "same seed: same prompts"
    assert min(r.max_new_tokens for r in longer.requests) >= 40 and max(r.max_new_tokens for r in longer.requests) <= 60
    for bad in ([16], [[16]], [[16, 64.5]], [[0, 8]], [[9, 8]]):
        with pytest.raises(InvalidParameterError):
            workload.with_answer_lengths(pool, 50, 3, bad)


@pytest.mark.e2e
def test_default_model_schedulers_match_the_plain_decoder(default_model):
    lm = default_model
    pool = workload.prompt_pool(lm.tokenizer)
    wl = workload.make_workload(pool, 6, seed=1, min_new_tokens=2, max_new_tokens=8)
    decoder = Decoder(lm.model, lm.tokenizer, cache="static")
    expected = {r.request_id: decoder.generate(list(r.prompt_ids), GenerationConfig(r.max_new_tokens)).token_ids
                for r in wl.requests}
    assert len({len(r.prompt_ids) for r in wl.requests}) > 2
    for scheduler in ("static", "dynamic", "continuous"):
        result = batching.run(scheduler, lm.model, wl.requests, max_batch=4, timeout_ms=0, tokenizer=lm.tokenizer)
        assert result.tokens == expected, scheduler


@pytest.mark.slow
def test_benchmark_helpers_on_a_small_grid(tiny):
    from llmopt.bench import batching_benchmark as bench

    pool = workload.random_pool(tiny.config.vocab_size, 8, 2, 12, seed=2)
    wl = workload.make_workload(pool, 6, seed=1, min_new_tokens=2, max_new_tokens=6)
    frame, runs = bench.run_grid(tiny, {"burst": wl, "single": wl.head(2)}, bench.configurations([1, 2]),
                                 repeats=1, timeout_ms=0, progress=False)
    assert len(frame) == 2 * 7 and set(frame.scheduler) == set(batching.SCHEDULERS)
    checks = bench.equivalence(runs)
    assert (checks.identical == checks.requests).all()
    ablation, ablation_runs = bench.run_grid(tiny, {"burst": wl}, [("continuous", 2), (bench.PREFILL_ALONE, 2)],
                                             repeats=2, timeout_ms=0, progress=False)
    assert ablation_runs[("burst", bench.PREFILL_ALONE, 2, 0)].mixed_steps == 0
    assert ablation_runs[("burst", "continuous", 2, 0)].mixed_steps > 0
    ratio = bench.paired_scheduler_ratio(ablation, "continuous", bench.PREFILL_ALONE, 2)
    assert len(ratio) == 2 and (ratio > 0).all()
    assert ratio.iloc[1] == ablation.tokens_per_s.iloc[2] / ablation.tokens_per_s.iloc[3]
    partial, _ = bench.run_grid(tiny, {"burst": wl}, bench.configurations([2, 3]), repeats=2, timeout_ms=0,
                                progress=False, repeat_only=[3])
    second = partial[partial.repeat == 1]
    assert (len(partial) == 7 + 4 and set(second.max_batch) == {1, 3}
            and set(second.scheduler) == set(batching.SCHEDULERS))
    repeated = bench.summarize(partial).set_index(["scheduler", "max_batch"]).repeats
    assert repeated[("sequential", 1)] == 2 and repeated[("static", 3)] == 2 and repeated[("static", 2)] == 1
    summary = bench.summarize(frame)
    sequential = summary[summary.scheduler == "sequential"]
    assert (sequential.throughput_vs_sequential == 1).all()
    table = bench.by_concurrency(summary[summary.workload == "burst"], [1, 2], summary[summary.workload == "single"])
    assert len(table) == 8 and set(table[table.concurrency == 1].workload) == {"single"}
    document = bench.document_table(summary, "burst", concurrency=2, single_workload="single")
    assert {"static", "dynamic", "continuous", "sequential"} <= set(document.scheduler)
    assert document.verdict.str.len().gt(0).sum() >= len(document) - 3  # decode-phase rows carry no estimate
    # another backlog (other answer lengths) gets its own continuous / sequential throughput row
    longer_frame, _ = bench.run_grid(tiny, {"longer": wl.head(3)}, [("sequential", 1), ("continuous", 2)],
                                     repeats=1, timeout_ms=0, progress=False)
    longer = bench.summarize(longer_frame).set_index("scheduler").tokens_per_s
    with_longer = bench.document_table(pd.concat([summary, bench.summarize(longer_frame)]), "burst", concurrency=2,
                                       single_workload="single", other_workloads=["longer"])
    extra = with_longer[with_longer.quantity.str.endswith("(longer)")]
    assert len(with_longer) == len(document) + 1 and list(extra.scheduler) == ["continuous"]
    assert extra.measured.iloc[0].startswith(f"{longer['continuous'] / longer['sequential']:.2f}x")
    with pytest.raises(InvalidParameterError, match="'absent'"):
        bench.document_table(summary, "burst", concurrency=2, other_workloads=["absent"])


@pytest.mark.slow
def test_transformers_continuous_batching_engine_maps_requests_back():
    from llmopt.bench import batching_benchmark as bench
    from llmopt.engine.testing import tiny_pair

    hf_model, ours = tiny_pair("llama", seed=3)
    pool = workload.random_pool(ours.config.vocab_size, 6, 2, 10, seed=4)
    wl = workload.make_workload(pool, 5, seed=2, min_new_tokens=2, max_new_tokens=6)
    expected = reference_tokens(ours, wl.requests, eos=[2])
    result = bench.transformers_continuous(hf_model, wl.requests, max_batch=2, eos_token_ids=[2])
    assert sorted(result.tokens) == [r.request_id for r in wl.requests]
    assert result.tokens == expected


def test_transformers_continuous_batching_support_is_checked(monkeypatch):
    import transformers

    from llmopt.bench import batching_benchmark

    assert batching_benchmark.transformers_continuous_unsupported() is None  # the pinned range has it

    class OlderConfig:  # an older release's signature: a field renamed
        def __init__(self, max_requests_per_batch=1, block_size=32, num_blocks=1, max_batch_tokens=1):
            pass

    monkeypatch.setattr(transformers, "ContinuousBatchingConfig", OlderConfig)
    assert "page_size" in batching_benchmark.transformers_continuous_unsupported()


def test_continuous_joint_prefill_with_requests_done_at_their_first_token(tiny):
    """Several requests join at once (one packed prefill into their slots); some are done after one token, so
    the later joiners' slots move down to keep the active slots contiguous. Tokens stay the plain decoder's."""
    pool = workload.random_pool(tiny.config.vocab_size, 10, 2, 30, seed=7)
    wl = workload.make_workload(pool, 10, seed=3, min_new_tokens=1, max_new_tokens=9)
    requests = [batching.Request(r.request_id, r.prompt_ids, 1 if r.request_id % 3 == 0 else r.max_new_tokens,
                                 r.arrival_s) for r in wl.requests]
    expected = reference_tokens(tiny, requests, eos=[])
    result = batching.run("continuous", tiny, requests, max_batch=6, eos_token_ids=[])
    assert result.tokens == expected
    assert sum(len(t) == 1 for t in result.tokens.values()) >= 3


@pytest.mark.parametrize("scheduler", batching.SCHEDULERS)
def test_schedulers_keep_the_tokens_on_our_cpu_kernels(tiny, mixed, scheduler):
    """The same check with the linear layers on llmopt's GEMV kernels (batch-invariant by construction)."""
    import copy

    from llmopt.engine import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip(f"llmopt CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    wl, eos, expected = mixed
    model = cpu_kernels.use_gemv(copy.deepcopy(tiny))
    result = batching.run(scheduler, model, wl.requests, max_batch=4, timeout_ms=5, eos_token_ids=eos)
    assert result.tokens == reference_tokens(model, wl.requests, eos)


def test_packed_prefill_keeps_each_prompt_to_itself(tiny):
    view = batching._SlotMixedStep(batching.SlotCache(tiny.config, 4, 8), 0, [3, 1, 2], first_slot=1)
    assert view.positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert view.logits_at.tolist() == [2, 3, 5]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for start, n in ((0, 3), (3, 1), (4, 2)):
        expected[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(view.mask[0, 0], expected)


def test_packed_prefill_logits_equal_each_prompt_alone(tiny):
    """Three prompts in one packed row give, at each prompt's end, the logits of that prompt run alone."""
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    slots = batching.SlotCache(tiny.config, 3, 8)
    view = batching._SlotMixedStep(slots, 0, [4, 2, 3])
    tokens = torch.tensor([[t for p in prompts for t in p]])
    assert tokens.tolist() == [[3, 4, 5, 6, 7, 8, 9, 10, 11]]
    with torch.inference_mode():
        packed = tiny(tokens, view.positions, view, view.mask, logits_at=view.logits_at)
        view.finish()
        for i, prompt in enumerate(prompts):
            alone = tiny(torch.tensor([prompt]), torch.arange(len(prompt)), None, last_only=True)
            torch.testing.assert_close(packed[0, i], alone[0, -1], rtol=1e-5, atol=1e-5)
    assert slots.lengths == [4, 2, 3]


def test_paired_ratios_pair_each_run_with_the_sequential_run_of_its_repeat():
    import pandas as pd

    from llmopt.bench import batching_benchmark as bench

    frame = pd.DataFrame({"workload": ["b"] * 4, "scheduler": ["sequential", "continuous"] * 2,
                          "max_batch": [1, 8] * 2, "repeat": [0, 0, 1, 1], "tokens_per_s": [10.0, 30.0, 5.0, 20.0]})
    assert bench.paired_ratios(frame).tolist() == [1.0, 3.0, 1.0, 4.0]
    frame["contended"], frame["latency_p50_s"] = False, 1.0
    row = bench.summarize(frame).set_index("scheduler").loc["continuous"]
    assert (row.throughput_ratio_low, row.throughput_ratio_high) == (3.0, 4.0)
    assert row.throughput_vs_sequential == 25.0 / 7.5  # the ratio of the medians


def test_answer_length_table_pairs_each_workload_with_its_own_sequential_runs(tiny):
    from llmopt.bench import batching_benchmark as bench

    pool = workload.random_pool(tiny.config.vocab_size, 8, 2, 12, seed=3)
    workloads = {"short": workload.make_workload(pool, 5, seed=1, min_new_tokens=1, max_new_tokens=2),
                 "long": workload.make_workload(pool, 5, seed=1, min_new_tokens=6, max_new_tokens=9)}
    frame, runs = bench.run_grid(tiny, workloads, [("sequential", 1), ("continuous", 3)], repeats=2, timeout_ms=0,
                                 progress=False)
    checks = bench.equivalence(runs)
    assert len(checks) == 8 and (checks.identical == checks.requests).all()
    summary = bench.summarize(frame)
    table = bench.answer_length_table(summary, workloads, concurrency=3).set_index("workload")
    assert list(table.answer_caps) == ["1-2", "6-9"] and (table.repeats == 2).all()
    assert table.prompt_tokens["short"] == table.prompt_tokens["long"]  # same seed: same prompts, other caps
    assert table.generated_tokens["long"] > table.generated_tokens["short"]
    assert ((table.sequential_prefill_share > 0) & (table.sequential_prefill_share <= 1)).all()
    for label in workloads:
        paired = bench.paired_ratios(frame[frame.workload == label]).loc[(label, "continuous", 3)]
        assert table.throughput_ratio_low[label] == paired.min() and table.throughput_ratio_high[label] == paired.max()
        row = summary[(summary.workload == label) & (summary.scheduler == "continuous")].iloc[0]
        assert table.throughput_vs_sequential[label] == row.throughput_vs_sequential
    with pytest.raises(InvalidParameterError, match="no sequential and continuous"):
        bench.answer_length_table(summary, workloads, concurrency=4)
