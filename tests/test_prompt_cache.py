"""Engine: the prompt cache on the real llama.cpp and the starter model — many prompts kept at
once (reserved sequences, host RAM, disk), interleaved conversations, restarts, and cache files
that are damaged, foreign or cannot be written."""
import array
import hashlib
import os
import stat
import threading
import time

import pytest

import localswarm as ls

pytest.importorskip("llama_cpp")

GREEDY = dict(temperature=0, max_tokens=12)


def chat(eng, *turns, system="You are a careful assistant."):
    msgs = [{"role": "system", "content": system}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return eng.tokenize(eng.formatter.render(msgs))


def long_system(words: int) -> str:
    """A system prompt of about 10 tokens per word (an agent's tool-laden prefix stands in)."""
    return "Rules of the project follow. " + " ".join(f"rule{i} keep-it-simple;" for i in range(words))


def answer(eng, toks, voters=1, **kw):
    g = eng.generate(toks, ls.SamplingParams(**dict(GREEDY, **kw)), voters, timeout=120)
    return g, g.results[0].text


def ask_past_the_slots(eng) -> list:
    """Two more prompts than the cache has reserved sequences, each answered: the oldest move to
    host RAM. The prompts, in order."""
    prompts = [chat(eng, f"Question number {i}: what is {i} squared?", system=long_system(8 + i))
               for i in range(ls.PROMPT_CACHE_SLOTS + 2)]
    for p in prompts:
        answer(eng, p, max_tokens=2)
    return prompts


@pytest.fixture
def fresh(starter_path, tmp_path):
    """A factory of engines of their own (closed at the end), disk cache in tmp_path."""
    made = []

    def make(**kw):
        kw.setdefault("voters", 2)
        kw.setdefault("ctx", 4096)
        kw.setdefault("parallel", 1)
        eng = ls.LlamaCppEngine(starter_path, **kw)
        made.append(eng)
        return eng
    yield make
    for eng in made:
        eng.close()


@pytest.fixture
def short_disk_min(monkeypatch):
    """Write prompts of 200+ tokens to disk (the real bar, 1,024, makes slow tests)."""
    monkeypatch.setattr(ls, "DISK_CACHE_MIN_TOKENS", 200)


def test_a_side_request_does_not_evict_the_conversation(fresh):
    """opencode's pattern: main turn, title request, follow-up. The follow-up decodes only what
    is new, and gives the same greedy answer as a cold engine."""
    eng = fresh()
    sys_prompt = long_system(40)
    main = chat(eng, "Write a function that adds two numbers.", system=sys_prompt)
    _, first = answer(eng, main)
    answer(eng, chat(eng, "Give this conversation a title."), max_tokens=4)       # the side request
    follow = chat(eng, "Write a function that adds two numbers.", first, "Now make it subtract.",
                  system=sys_prompt)
    g, text = answer(eng, follow)
    assert g.cached_tokens >= len(main), (g.cached_tokens, len(main))
    assert eng.counters["prompt_cache_hits"] >= 1
    cold = fresh(voters=1)
    assert answer(cold, follow)[1] == text


def test_two_interleaved_conversations_each_keep_their_prefix(fresh):
    eng = fresh()
    sys_a, sys_b = long_system(30), "You answer in French. " + long_system(25)
    a1, b1 = chat(eng, "Hello A", system=sys_a), chat(eng, "Bonjour B", system=sys_b)
    ta, tb = answer(eng, a1)[1], answer(eng, b1)[1]
    a2 = chat(eng, "Hello A", ta, "More, A.", system=sys_a)
    b2 = chat(eng, "Bonjour B", tb, "Encore, B.", system=sys_b)
    ga, gb = answer(eng, a2)[0], answer(eng, b2)[0]
    assert ga.cached_tokens >= len(a1) and gb.cached_tokens >= len(b1)


def test_least_recently_used_prompts_move_to_ram_and_come_back(fresh):
    """More prompts than reserved sequences: the oldest go to host RAM (within the budget) and
    are restored from there, not decoded again."""
    eng = fresh(cache_ram_bytes=64 * ls.MiB)
    prompts = ask_past_the_slots(eng)
    st = eng.cache_stats()
    assert st["entries_kv"] <= ls.PROMPT_CACHE_SLOTS and st["entries_ram"] >= 2
    assert 0 < st["ram_bytes"] <= 64 * ls.MiB
    g, _ = answer(eng, prompts[0], max_tokens=2)
    assert eng.counters["prompt_cache_restores_ram"] >= 1
    assert g.cached_tokens == len(prompts[0]) - 1


def test_under_memory_pressure_the_ram_copies_are_dropped_and_prompts_still_answer(fresh, caplog):
    eng = fresh(cache_ram_bytes=64 * ls.MiB)
    prompts = ask_past_the_slots(eng)
    held = eng.cache_stats()
    assert held["entries_ram"] >= 2 and held["ram_bytes"] > 0
    with caplog.at_level("WARNING", logger="localswarm"):
        eng.shed_memory()
        deadline = time.monotonic() + 10
        while eng.cache_stats()["entries_ram"] and time.monotonic() < deadline:
            time.sleep(0.05)
    st = eng.cache_stats()
    assert st["entries_ram"] == 0 and st["ram_bytes"] == 0 and st["entries_kv"] == held["entries_kv"]
    assert any("dropped" in r.getMessage() and "from RAM" in r.getMessage() for r in caplog.records)
    g, _ = answer(eng, prompts[0], max_tokens=2)        # its copy is gone: decoded again, answered
    assert g.cached_tokens < len(prompts[0]) - 1 and g.results[0].text


def test_a_small_ram_budget_is_never_exceeded(fresh):
    budget = 4 * ls.MiB     # room for one of these prompts' cells (~23 KB a token), not two
    eng = fresh(cache_ram_bytes=budget)
    for i in range(ls.PROMPT_CACHE_SLOTS + 4):
        answer(eng, chat(eng, f"Item {i}?", system=long_system(10 + i)), max_tokens=2)
        assert eng.cache_stats()["ram_bytes"] <= budget
    assert eng.cache_stats()["entries_ram"] == 1


def test_a_restarted_engine_restores_long_prompts_from_disk(fresh, tmp_path, short_disk_min):
    disk = dict(cache_dir=str(tmp_path / "cache"), cache_disk_bytes=512 * ls.MiB)
    first = fresh(**disk)
    answer(first, chat(first, "A short one."))           # under the bar: not written
    toks = chat(first, "Summarise the rules.", system=long_system(25))
    assert len(toks) >= ls.DISK_CACHE_MIN_TOKENS
    _, text = answer(first, toks)
    first.close()
    files = [f for _, _, f in first._disk.files()]
    assert len(files) == 1 and os.path.getsize(files[0]) > 1 * ls.MiB
    again = fresh(**disk)
    g, text2 = answer(again, toks)
    assert again.counters["prompt_cache_restores_disk"] == 1
    assert g.cached_tokens >= len(toks) - 1
    assert text2 == text


def _valid_cache_file(fresh, tmp_path) -> tuple:
    disk = dict(cache_dir=str(tmp_path / "cache"), cache_disk_bytes=512 * ls.MiB)
    eng = fresh(**disk)
    toks = chat(eng, "Summarise the rules.", system=long_system(25))
    _, text = answer(eng, toks)
    eng.close()
    return disk, toks, text, eng._disk.dir, [f for _, _, f in eng._disk.files()][0]


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign", "junk", "tmp"])
def test_damaged_or_foreign_cache_files_are_ignored_and_ours_removed(fresh, tmp_path, damage, short_disk_min):
    disk, toks, text, model_dir, path = _valid_cache_file(fresh, tmp_path)
    data = open(path, "rb").read()
    if damage == "truncated":
        open(path, "wb").write(data[:len(data) // 2])
    elif damage == "flipped":          # the header is fine, the cells are not: caught by the checksum
        open(path, "wb").write(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    elif damage == "foreign":          # another model's file in this model's directory
        open(path, "wb").write(data.replace(os.path.basename(model_dir).encode(), b"0" * 24, 1))
    elif damage == "junk":
        open(path, "wb").write(os.urandom(5000))
    else:                              # a write that never finished
        os.rename(path, path + ".tmp")
        path += ".tmp"
    eng = fresh(**disk)
    removed = 0 if damage == "junk" else 1      # without our magic it is not ours: left alone, unused
    if damage not in ("flipped", "junk"):       # seen at start-up; a bad checksum when the file is read
        assert not os.path.exists(path) and eng._disk.counters["files_removed"] == 1
    if damage == "junk":
        assert os.path.exists(path) and eng._disk.scan() == []
    g, text2 = answer(eng, toks)
    assert eng._disk.counters["files_removed"] == removed
    assert eng.counters["prompt_cache_restores_disk"] == 0 and g.cached_tokens == 0
    assert text2 == text
    eng._disk.flush()                  # written again, whole
    assert [os.path.basename(f) for _, _, f in eng._disk.files()] == [os.path.basename(path).replace(".tmp", "")]


def test_an_unwritable_cache_dir_only_turns_the_disk_cache_off(fresh, tmp_path, caplog, short_disk_min):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    eng = fresh(cache_dir=str(blocker / "cache"), cache_disk_bytes=512 * ls.MiB)
    assert "not writable" in caplog.text
    toks = chat(eng, "Summarise the rules.", system=long_system(25))
    answer(eng, toks)
    assert answer(eng, toks)[0].cached_tokens >= len(toks) - 1       # the RAM/KV cache still works


def test_a_full_disk_budget_writes_nothing_and_serves_on(fresh, tmp_path, short_disk_min):
    eng = fresh(cache_dir=str(tmp_path / "cache"), cache_disk_bytes=64 * 1024)
    toks = chat(eng, "Summarise the rules.", system=long_system(25))
    answer(eng, toks)
    eng._disk.flush()
    assert eng._disk.files() == [] and eng._disk.counters["writes_skipped"] >= 1


def test_the_disk_budget_evicts_the_least_recently_used_file(fresh, tmp_path, short_disk_min):
    eng = fresh(cache_dir=str(tmp_path / "cache"), cache_disk_bytes=16 * ls.MiB)   # two files, not three
    sizes = []
    for i in range(3):
        answer(eng, chat(eng, f"Summarise part {i}.", system=f"Part {i}. " + long_system(25)), max_tokens=2)
        eng._disk.flush()
        sizes.append(sum(s for _, s, _ in eng._disk.files()))
    assert max(sizes) <= 16 * ls.MiB and eng._disk.counters["files_evicted"] >= 1
    assert len(eng._disk.files()) == 2


def test_requests_go_on_while_an_entry_is_being_written(fresh, tmp_path, short_disk_min):
    eng = fresh(voters=2, parallel=2, cache_dir=str(tmp_path / "cache"), cache_disk_bytes=512 * ls.MiB)
    toks = chat(eng, "Summarise the rules.", system=long_system(25))
    results, errors = [], []

    def run(t):
        try:
            results.append(answer(eng, t, voters=2, max_tokens=6)[0])
        except Exception as exc:    # noqa: BLE001 - the assertion below reports it
            errors.append(exc)
    answer(eng, toks, max_tokens=2)                  # its write starts now, in the background
    threads = [threading.Thread(target=run, args=(t,)) for t in
               (toks, chat(eng, "Other question?"), toks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 3
    assert all(r.results[0].completion_tokens > 0 for r in results)
    eng._disk.flush()
    assert len(eng._disk.files()) == 1


def test_prefix_match_is_token_exact():
    assert ls.common_prefix_len([1, 2, 3, 4], [1, 2, 9]) == 2
    assert ls.common_prefix_len(list(range(9000)), list(range(9000))) == 9000
    assert ls.common_prefix_len(list(range(9000)), list(range(4567)) + [-1]) == 4567
    assert ls.common_prefix_len([], [1]) == 0
    cache = ls.PromptCache(ram_budget=10)
    a, b = ls.CacheEntry([1, 2, 3, 4, 5], seq=0), ls.CacheEntry([1, 2, 7], data=b"xy")
    cache.entries += [a, b]
    assert cache.match([1, 2, 3, 9]) == (a, 3)
    assert cache.match([1, 2, 3, 4, 5]) == (a, 4)          # the last token is always decoded
    assert cache.match([1, 2, 7, 7]) == (b, 3)
    assert cache.match([5]) == (None, 0)


def test_restoring_from_ram_never_loses_the_entry_or_its_slot(fresh):
    """With every slot taken and a RAM budget of about one entry, restoring the oldest prompt
    evicts another to RAM, which must not drop the one being restored (its slot would leak)."""
    eng = fresh(cache_ram_bytes=3 * ls.MiB)
    prompts = [chat(eng, f"Q{i}?", system=long_system(8 + i)) for i in range(ls.PROMPT_CACHE_SLOTS + 3)]
    for _ in range(2):
        for p in prompts:
            answer(eng, p, max_tokens=1)
    st = eng.cache_stats()
    assert st["entries_kv"] == ls.PROMPT_CACHE_SLOTS and len(eng._cache.free_slots) == 0
    slots = sorted(e.seq for e in eng._cache.entries if e.seq >= 0)
    assert slots == list(range(ls.PROMPT_CACHE_SLOTS))          # each slot held by exactly one entry


def test_the_engine_thread_survives_a_failure_outside_a_step(fresh):
    eng = fresh()
    real, calls = eng._admit, {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        real()
    eng._admit = broken
    toks = chat(eng, "Hello?")
    with pytest.raises(ls.ApiError) as e:         # the request caught in the failure gets a 500
        answer(eng, toks, max_tokens=2)
    assert e.value.status == 500
    with eng._cv:                                 # then the context reloads (503 meanwhile)
        eng._cv.wait_for(lambda: eng.healthy, timeout=60)
    assert eng._thread.is_alive()
    assert answer(eng, toks, max_tokens=2)[0].results[0].completion_tokens == 2


# --- the cache's files are private and only ours (hardening round 3) -------------------------
def cache_name(tokens) -> str:
    return hashlib.sha256(array.array("i", tokens).tobytes()).hexdigest()[:32] + ".kv"


def disk_cache(root, budget=1 * ls.MiB):
    return ls.DiskCache(str(root), "model-key", budget)


def test_cache_directories_and_files_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        os.makedirs(tmp_path / "c" / "model-key", mode=0o755)      # as an older version left it
        d = disk_cache(tmp_path / "c")
        assert d.save([1, 2, 3], b"x" * 1000)
        d.flush()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d.dir).st_mode) == 0o700
    [(_, _, path)] = d.files()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    fresh = disk_cache(tmp_path / "new")
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700 and fresh.enabled      # a root it made


def test_a_shared_folder_chosen_as_the_cache_root_keeps_its_mode(tmp_path):
    """Only the model's own directory is made private; the user's folder above it is theirs."""
    shared = tmp_path / "team"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    d = disk_cache(shared)
    assert d.save([1, 2], b"x" * 100)
    d.flush()
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(d.dir).st_mode) == 0o700


def test_the_disk_budget_deletes_only_files_the_cache_wrote(tmp_path):
    root = tmp_path / "c"
    d = disk_cache(root, budget=3000)
    mine = {root / "notes.kv": b"my notes", root / "model-key" / cache_name([7]): b"not a cache file" * 100,
            root / "other" / "deep" / "x.kv": b"mine too" * 500}
    for path, data in mine.items():
        os.makedirs(path.parent, exist_ok=True)
        path.write_bytes(data)
    for i in range(4):
        assert d.save([i] * 50, b"y" * 1000)
        d.flush()
    assert all(p.read_bytes() == data for p, data in mine.items())
    assert len(d.files()) == 2 and d.counters["files_evicted"] == 2
    assert d.scan() and all(p.exists() for p in mine)          # start-up leaves them alone too


def test_a_fifo_or_a_link_under_a_cache_name_does_not_hang_start_up(tmp_path):
    model_dir = tmp_path / "c" / "model-key"
    os.makedirs(model_dir)
    os.mkfifo(model_dir / cache_name([1]))
    os.symlink(model_dir / cache_name([1]), model_dir / cache_name([2]))
    os.symlink("/etc/passwd", model_dir / cache_name([3]))
    found = []
    t = threading.Thread(target=lambda: found.append(disk_cache(tmp_path / "c").scan()), daemon=True)
    t.start()
    t.join(10)
    assert found == [[]], "scanning the cache dir hung on a FIFO"
    assert os.path.exists(model_dir / cache_name([1])) and os.path.islink(model_dir / cache_name([3]))


def test_a_link_planted_at_the_temp_name_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = disk_cache(tmp_path / "c")
    name = cache_name([5, 6])
    for planted in (name + ".tmp", name):           # the old fixed temp name, and the final name
        os.symlink(victim, os.path.join(d.dir, planted))
    assert d.save([5, 6], b"z" * 500)
    d.flush()
    assert victim.read_text() == "precious"
    final = os.path.join(d.dir, name)
    assert not os.path.islink(final) and d._read_header(final)[0] == [5, 6]
    assert os.path.islink(os.path.join(d.dir, name + ".tmp"))         # someone else's: left alone


def test_a_request_that_fails_while_being_admitted_is_answered_at_once(fresh):
    """Out of the queue but not yet a run (a MemoryError copying cells or reading a cache file):
    its client gets the 500 now, not at its timeout."""
    eng = fresh()
    real = eng._reuse_prefix
    eng._reuse_prefix = lambda *a: (_ for _ in ()).throw(MemoryError("injected"))
    toks = chat(eng, "Hello?")
    t0 = time.monotonic()
    with pytest.raises(ls.ApiError) as e:
        answer(eng, toks, max_tokens=2)
    assert e.value.status == 500 and "injected" in e.value.message and time.monotonic() - t0 < 20, time.monotonic() - t0
    eng._reuse_prefix = real
    with eng._cv:
        eng._cv.wait_for(lambda: eng.healthy, timeout=60)
    assert answer(eng, toks, max_tokens=2)[0].results[0].completion_tokens == 2
