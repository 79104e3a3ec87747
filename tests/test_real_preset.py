"""The real-model preset's parts (`experiments/real_presets.py`, `experiments/demo/setup.py`
setup_real, `experiments/standins.py`): vocabularies of one family at two sizes and of two
families, every stop id, per-task answer budgets, a multi-task file mix, long examples cut or
dropped with their counts. The whole demo on these stand-ins is `tests/test_demo.py`."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.demo.setup import setup_real
from experiments.presets import get_preset
from experiments.real_presets import REAL_PRESETS
from experiments.standins import dolly_jsonl, dolly_rows, standin_tokenizer, write_standin
from floe_jax.config import ConfigError, ModelConfig
from floe_jax.data.hf_datasets import load_instruction_dataset
from floe_jax.data.tokenizer import encode_example, encode_examples, encode_prompt, long_examples
from floe_jax.decode import generate
from floe_jax.inference.align import StringMapper, build_map, vocab_of
from floe_jax.model import init_params

TEXTS = [f"{r['instruction']} {r['context']} {r['response']}" for r in dolly_rows(64)]


@pytest.fixture(scope="module")
def toks():
    return {
        "qwen2": standin_tokenizer("qwen2", 300, TEXTS, seed=1),
        "llama3": standin_tokenizer("llama3", 340, TEXTS, seed=0),
    }


def test_one_family_at_two_vocabulary_sizes_maps_every_shared_id_to_itself(toks):
    """Qwen2.5-0.5B (151,936 rows) and 7B (152,064) share one tokenizer: the map is the identity
    on every token id, special tokens without a role (<|im_start|>) included, and the cloud's
    extra rows (no token) map nowhere."""
    tok = toks["qwen2"]
    n = len(tok)
    vm = build_map(vocab_of(tok, size=n + 84), vocab_of(tok, size=n + 20))
    np.testing.assert_array_equal(vm.cloud_to_edge[:n], np.arange(n))
    assert vm.exact[:n].all() and (vm.cloud_to_edge[n:] == -1).all()
    assert vm.edge_size == n + 20 and vm.cloud_size == n + 84
    # the same by strings, as the http cloud lists them
    mapper = StringMapper(vocab_of(tok))
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert mapper(t) == tok.convert_tokens_to_ids(t)


def test_two_families_map_end_of_turn_to_the_edges_declared_eos(toks):
    """A Qwen cloud's <|im_end|> lands on a Llama 3 edge's declared eos <|eot_id|> (its end of
    turn), not on the first eos-like token <|end_of_text|>; plain tokens map by their text."""
    edge, cloud = toks["llama3"], toks["qwen2"]
    vm = build_map(vocab_of(cloud), vocab_of(edge))
    eot = edge.convert_tokens_to_ids("<|eot_id|>")
    assert edge.eos_token_id == eot != edge.convert_tokens_to_ids("<|end_of_text|>")
    assert vm.cloud_to_edge[cloud.convert_tokens_to_ids("<|im_end|>")] == eot
    assert StringMapper(vocab_of(edge))("<|im_end|>") == eot
    word = cloud.encode(" river", add_special_tokens=False)
    if len(word) == 1:  # a whole word in both: the same text
        assert edge.decode([int(vm.cloud_to_edge[word[0]])]) == " river"
    assert vm.coverage()["exact"] > 0.5  # one byte alphabet, overlapping merges


def test_a_chat_template_that_writes_bos_gets_one_bos(toks):
    """Llama 3's template starts with <|begin_of_text|>: the prompt's ids hold it once; Qwen's
    has no bos; the template's special tokens encode as their ids, not as text."""
    from experiments.demo.setup import chat_prompt

    llama, qwen = toks["llama3"], toks["qwen2"]
    ids = encode_prompt(llama, chat_prompt(llama, "hello"))
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    assert llama.convert_tokens_to_ids("<|start_header_id|>") in ids
    ids = encode_prompt(qwen, chat_prompt(qwen, "hello", system="Be brief."))
    assert qwen.bos_token_id is None and ids[0] == qwen.convert_tokens_to_ids("<|im_start|>")
    assert qwen.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_generation_stops_on_any_of_the_eos_ids():
    """`eos_id` as a tuple: a row stops at the first emitted id of the tuple."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=64)  # fmt: skip
    params = init_params(cfg, key=jax.random.key(0))
    tokens, mask = jnp.array([[5, 6, 7, 8]], jnp.int32), jnp.ones((1, 4), jnp.int32)
    kw = dict(cfg=cfg, max_new_tokens=6, key=jax.random.key(1))
    free = np.asarray(generate(params, tokens, mask, **kw)[0])[0]
    second = int(free[1])
    first_at = int(np.flatnonzero(free == second)[0])  # its first occurrence (greedy may repeat)
    other = next(i for i in range(64) if i not in free)  # never emitted
    out, lengths = generate(params, tokens, mask, eos_id=(other, second), **kw)
    assert int(np.asarray(lengths)[0]) == first_at + 1
    np.testing.assert_array_equal(np.asarray(out)[0, : first_at + 1], free[: first_at + 1])


def test_fused_decoding_takes_a_list_of_eos_ids():
    from floe_jax.inference.fused import FusedDecodeConfig

    c = FusedDecodeConfig(max_new_tokens=4, eos_id=[151645, 151643])
    assert c.eos_id == (151645, 151643) and hash(c)  # a static argument
    assert FusedDecodeConfig(max_new_tokens=4, eos_id=7).eos_id == 7
    with pytest.raises(ConfigError, match="eos_id"):
        FusedDecodeConfig(max_new_tokens=4, eos_id=[])


def test_budgets_and_preset_checks():
    p = get_preset("qwen", ["max_new_tokens=100", "max_new_tokens_by_task=classification=8"])
    assert p.budget("classification") == 8 and p.budget("open_qa") == 100
    for bad in ("classification", "classification=0", "a=1,a=2", "=4"):
        with pytest.raises(ConfigError, match="max_new_tokens_by_task"):
            get_preset("qwen", [f"max_new_tokens_by_task={bad}"])
    with pytest.raises(ConfigError, match="fed.rounds.seq_len must be set"):
        get_preset("qwen", ["fed.rounds.seq_len=none"])
    with pytest.raises(ConfigError, match="split"):
        get_preset("qwen", ["split=iid"])
    assert REAL_PRESETS["qwen"].num_clients == 64 and REAL_PRESETS["qwen"].split == "dirichlet"


def test_fedit_style_mix_of_task_files(tmp_path):
    """Files of one task each, tasks named by file: their examples in order, labels sorted."""
    for name, n in (("open_qa", 3), ("classification", 2)):
        rows = [{"instruction": f"{name} {i}", "response": f"r{i}"} for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = [str(tmp_path / "open_qa.jsonl"), str(tmp_path / "classification.jsonl")]
    data = load_instruction_dataset(files, prompt_column="instruction", task_from_file=True)
    assert data.task_names == ("classification", "open_qa")
    assert [data.task_names[t] for t in data.task_ids] == ["open_qa"] * 3 + ["classification"] * 2
    assert data.prompts[3] == "classification 0" and len(data) == 5
    with pytest.raises(ValueError, match="task_column must be None"):
        load_instruction_dataset(files, task_column="category", task_from_file=True)


def test_truncation_keeps_the_head_of_an_example(toks):
    tok = toks["qwen2"]
    pairs = [("a short prompt", "yes"), ("a prompt " * 6, "the answer is long " * 8)]
    full = [encode_example(tok, p, r) for p, r in pairs]
    prompt = len(full[1][1]) - sum(full[1][1])
    T = max(prompt, len(full[0][0])) + 5  # the long example's response starts before T
    assert len(full[1][0]) > T
    got = encode_examples(tok, pairs, seq_len=T, truncate=True)
    np.testing.assert_array_equal(got["tokens"][1], full[1][0][:T])
    np.testing.assert_array_equal(got["loss_mask"][1], full[1][1][:T])
    with pytest.raises(ValueError, match="tokens > seq_len"):
        encode_examples(tok, pairs, seq_len=T)
    longer, no_room = long_examples(tok, pairs, T)
    assert longer.tolist() == [False, True] and no_room.tolist() == [False, False]
    with pytest.raises(ValueError, match="no response is left"):
        encode_examples(tok, [("a prompt " * 20, "x")], seq_len=8, truncate=True)


def _shapes_only_preset(root, toks, **kw):
    """Config + tokenizer folders (no weights) of a Llama edge and a Qwen2 cloud."""
    dolly_jsonl(root / "dolly.jsonl", 64)
    for name, family, cfg in (
        ("edge", "llama3", dict(model_type="llama", num_attention_heads=4)),
        ("cloud", "qwen2", dict(model_type="qwen2", num_attention_heads=4)),
    ):
        tok = toks[family]
        cfg |= dict(vocab_size=len(tok) + 16, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-6,
                    max_position_embeddings=512)  # fmt: skip
        write_standin(root / name, family, tok, cfg)
    return dataclasses.replace(
        get_preset("qwen"), edge_path=str(root / "edge"), cloud_path=str(root / "cloud"),
        dataset=str(root / "dolly.jsonl"), num_clients=8, dirichlet_alpha=5.0, test_per_client=1,
        dtype="float32",
        **kw,
    )  # fmt: skip


def test_budgets_and_closed_tasks_must_name_the_datas_tasks(tmp_path, toks):
    """A task name the data does not have (a typo) is an error naming the field and the data's
    tasks, not a budget or an exact-match score silently left out."""
    preset = _shapes_only_preset(tmp_path, toks, max_new_tokens_by_task="clasification=8")
    with pytest.raises(ValueError, match=r"max_new_tokens_by_task names tasks \['clasification'\]"
                       r".*its tasks: \['brainstorming'"):  # fmt: skip
        setup_real(preset, shapes_only=True)
    preset = dataclasses.replace(preset, max_new_tokens_by_task="", closed_tasks=("closed-qa",))
    with pytest.raises(ValueError, match=r"closed_tasks names tasks \['closed-qa'\]"):
        setup_real(preset, shapes_only=True)


@pytest.mark.parametrize("how", ["truncate", "filter"])
def test_long_examples_are_cut_or_dropped_and_counted(tmp_path, toks, how):
    """setup_real (abstract shapes, no weights) against the edge's own encoding of every
    example: `filter` drops each example past seq_len, `truncate` only the ones whose prompt
    fills it; every client holds a test query and training data."""
    base = _shapes_only_preset(tmp_path, toks, long_examples=how)
    prompt_len = {}
    probe = setup_real(base, shapes_only=True)  # seq_len 512: nothing is long
    assert probe.real.data["longer_than_seq_len"] == 0 and probe.real.data["used"] == 64
    assert isinstance(probe.edge_params["embed"], jax.ShapeDtypeStruct)
    for q in probe.bench.queries:
        prompt_len[q.prompt] = len(encode_example(probe.tokenizer, q.prompt, q.answer)[0])
    lengths = sorted(prompt_len.values())
    T = lengths[len(lengths) // 2]  # about half the queries' examples are longer
    preset = dataclasses.replace(
        base, fed=dataclasses.replace(
            base.fed, rounds=dataclasses.replace(base.fed.rounds, seq_len=T)))  # fmt: skip
    got = setup_real(preset, shapes_only=True)
    d = got.real.data
    rows = dolly_rows(64)
    pairs = [(probe.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{r['instruction']}\n\n{r['context']}" if r["context"]
          else r["instruction"]}], tokenize=False, add_generation_prompt=True), r["response"])
        for r in rows]  # fmt: skip
    longer, no_room = long_examples(probe.tokenizer, pairs, T)
    assert d["longer_than_seq_len"] == int(longer.sum()) > 0
    dropped = longer if how == "filter" else no_room
    assert d["dropped"] == int(dropped.sum()) and d["used"] == 64 - d["dropped"]
    assert d["truncated"] == (int((longer & ~no_room).sum()) if how == "truncate" else 0)
    assert sum(c["train"] + c["test"] + c["unused"] for c in d["clients"]) == d["used"]
    kept = {p for (p, _), drop in zip(pairs, dropped, strict=True) if not drop}
    assert {q.prompt for q in got.bench.queries} <= kept
    assert all(e.prompt in kept for ex in got.bench.client_examples for e in ex)


def test_the_cloud_is_sent_its_own_template_and_the_answer_so_far(toks):
    """`CloudPrompts`: ids that start with a query's edge-templated prompt become the query's
    cloud-templated prompt plus the edge's answer so far; other ids decode as they are."""
    from experiments.demo.evaluate import CloudPrompts
    from experiments.demo.setup import chat_prompt

    edge, cloud = toks["llama3"], toks["qwen2"]
    questions = ["what about the river?", "name a stone"]
    prompts = [encode_prompt(edge, chat_prompt(edge, q)) for q in questions]
    texts = [chat_prompt(cloud, q) for q in questions]

    def decode(ids):
        return edge.decode(ids, skip_special_tokens=True)

    to_cloud = CloudPrompts(decode, prompts, texts)
    answer = edge.encode(" The river", add_special_tokens=False)
    assert to_cloud(prompts[1] + answer) == texts[1] + " The river"
    assert to_cloud(prompts[0]) == texts[0]
    assert to_cloud(answer) == " The river"


def test_eos_ids_read_every_stop_of_generation_config(tmp_path, toks):
    from floe_jax.hf.config import eos_ids

    tok = toks["qwen2"]
    cfg = ModelConfig(vocab_size=320, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1, eos_token_id=5)  # fmt: skip
    gen = tmp_path / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": [tok.eos_token_id, 7]}))
    assert eos_ids(str(tmp_path), tok, cfg) == (tok.eos_token_id, 7, 5)  # no repeats
    gen.write_text(json.dumps({"eos_token_id": 9}))
    assert eos_ids(str(tmp_path), tok, cfg) == (9, 5, tok.eos_token_id)
    gen.write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
        eos_ids(str(tmp_path), tok, cfg)
    gen.unlink()  # no generation config: the config's and the tokenizer's
    assert eos_ids(str(tmp_path), tok, cfg) == (5, tok.eos_token_id)


def test_serve_cloud_stops_on_the_checkpoints_generation_config_eos(tmp_path, monkeypatch):
    """`serve-cloud --checkpoint` hands the server every stop of the folder, generation_config's
    list included (an instruct model's turn end), not only config.json's eos."""
    from _serve_util import chat_model, chat_tokenizer

    import floe_jax.inference.server as server
    from experiments import serve_cloud
    from floe_jax.hf.checkpoint import save_hf

    tok = chat_tokenizer()
    cfg, params = chat_model(tok)
    save_hf(dataclasses.replace(cfg, eos_token_id=3), params, tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 11]}))
    seen = {}
    monkeypatch.setattr(server, "serve_cloud", lambda *a, **kw: seen.update(kw))
    assert serve_cloud.main(["--checkpoint", str(tmp_path), "--port", "0"]) == 0
    assert seen["eos_ids"] == (3, 11, tok.eos_token_id)
