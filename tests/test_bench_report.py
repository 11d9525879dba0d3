"""The benchmark report's computed sentences say only what their figures support.

Nothing here measures speed: these feed the report's pure functions fixed figures and check
the verdicts and the arithmetic they write.
"""

from __future__ import annotations

from bench import capacity, enqueue_scale
from bench.run import growth_cost_lines


def test_capacity_divides_one_second_by_redis_cpu_per_turn_and_names_the_first_limit():
    m = capacity.Measured(redis_enqueue_us=25, redis_worker_us=500, redis_consumer_us=100, worker_cpu_us=7000,
                          bytes_rate1=30_000, bytes_rate01=18_000)
    assert capacity.turns_s_per_core(m) == 1e6 / 625
    assert capacity.cpu_turns_day(m) == 1600 * capacity.HEADROOM / capacity.PEAK * 86_400
    text = "\n".join(capacity.lines(m))
    assert "One Redis core carries ≈ 1,600 turns/s" in text
    # 16 GB / (30 kB × 1 day) ≈ 0.53M turns a day, below the CPU limit (≈ 23M): memory first.
    assert "rate 1.0, 1 d: past ≈ 0.53M turns a day (memory first)" in text

    cheap = capacity.Measured(redis_enqueue_us=25, redis_worker_us=50_000, redis_consumer_us=100,
                              worker_cpu_us=7000, bytes_rate1=100, bytes_rate01=50)
    assert "(CPU first)" in "\n".join(capacity.lines(cheap))


def test_enqueue_goal_is_met_only_at_or_above_its_ratio_and_rehash_is_named_only_when_seen():
    F = enqueue_scale.Figures
    met = " ".join(enqueue_scale.explain(F(0.95, 0.97, 0.98, 0.99, 0.99, 6, 0, 0)))
    assert "Goal ≥ 0.9× (read from the 10 first and last calls: one call is one noisy sample): met" in met
    assert "redis-server's 1.01×" in met
    missed = " ".join(enqueue_scale.explain(F(0.80, 0.95, 0.70, 0.70, 0.99, 6, 7, 3)))
    assert "**missed** (0.80×)" in missed
    assert "rehashed after 7 of the last 10 calls" in missed
    assert "a rewrite was running after 3 of the last 10 calls" in missed
    assert "the rest of the wall-clock loss is waiting" in missed
    unexplained = " ".join(enqueue_scale.explain(F(0.80, 0.70, 0.70, 0.70, 0.99, 6, 0, 0)))
    assert "not explained here" in unexplained


def _size(size: int, chunk: int, redis_us: float, llen: float, purged: int) -> dict[str, float]:
    return {"size": size, "chunk": chunk, "turns_s": 60, "worker_cpu_us_turn": 10_000,
            "redis_cpu_us_turn": redis_us, "consumer_cpu_us_turn": 600, "consumer_redis_us_turn": 180,
            "idle_worker_cpu_s": 3.0, "purged": purged, "cmd:evalsha:calls": 10.0,
            "cmd:evalsha:us": redis_us / 2, "cmd:llen:calls": llen, "cmd:llen:us": llen}


def test_growth_names_the_reconciler_only_when_its_walk_grows():
    flat = "\n".join(growth_cost_lines([_size(1000, 1000, 850, 4, 0), _size(10_000, 9000, 870, 4, 0)]))
    assert "no part grows by more than 15%" in flat
    assert "reconciler" not in flat
    walk = "\n".join(growth_cost_lines([_size(1000, 1000, 850, 4, 0), _size(10_000, 9000, 1100, 13, 0)]))
    assert "grows: redis-server's CPU in the drain" in walk
    assert "read 2.0 conversations a turn at 1,000 and 11.0 at 10,000" in walk
    same_walk = "\n".join(growth_cost_lines([_size(1000, 1000, 850, 4, 0), _size(10_000, 9000, 1100, 4, 0)]))
    assert "Not the reconciler" in same_walk


def test_redis_profile_puts_a_scripts_inner_commands_under_the_script(redis_url: str):
    """Redis 6 logs the commands a script calls as entries of their own (client ``?:0``): the
    profile counts them inside their script, not twice, and names the script from its file."""
    import redis as redis_sync

    from bench import redis_cost
    from turnfleet.scripts import load_script

    names = redis_cost.script_names()
    renew = load_script("renew")
    assert names[__import__("hashlib").sha1(renew.body.encode()).hexdigest()] == "renew"
    r = redis_sync.Redis.from_url(redis_url)
    redis_cost._slowlog_start(redis_url)
    r.set("k", "v")
    r.eval("redis.call('SET', 'a', '1'); redis.call('SET', 'b', '2'); return redis.call('GET', 'a')", 0)
    r.close()
    taken = redis_cost._slowlog_take(redis_url, names)
    assert taken["SET"][""][0] == 1  # the top-level SET only
    script = taken["EVAL (inline script)"]
    assert script[""][0] == 1 and script["SET"][0] == 2 and script["GET"][0] == 1
    assert "GET" not in taken
    rows = "\n".join(redis_cost._command_rows(taken, 1, 10.0))
    assert "| EVAL (inline script) | 1.00 |" in rows and "SET 2.00×" in rows


def test_cpu_split_finds_the_running_tasks_frames_on_uvloop_too():
    """asyncio's loop shows its dispatch (``Handle._run``); uvloop's is C, so a task's frames
    follow the frame that started the loop. Both go to the part of the innermost owned frame."""
    from bench import profile

    outer = ["<module> (turnfleet/shell/cli.py:10)", "main (turnfleet/shell/cli.py:99)",
             "run (asyncio/runners.py:118)"]
    task = ["run_turn (workers/job.py:70)", "run (workers/attempt.py:300)",
            "on_span_end (workers/trace_store.py:120)"]
    assert profile.part_of(outer + task) == "telemetry and tracing"  # uvloop: no Handle._run
    assert profile.part_of(outer + ["_run_once (asyncio/base_events.py:1900)", "Handle._run (asyncio/events.py:80)",
                                    *task]) == "telemetry and tracing"
    assert profile.part_of(outer) == "event loop and I/O (asyncio, redis-py) not owned by a part"
