"""floe_jax.data.benchmark and floe_jax.data.tokenizer: determinism, derivable answers, private
spans, task labels, exact-match scoring, tokenizer round trip through AutoTokenizer; presets."""

import dataclasses
import re

import pytest

from floe_jax.config import ConfigError
from floe_jax.data.benchmark import (
    QUERY_TYPES,
    TASKS,
    BenchmarkConfig,
    Query,
    make_benchmark,
    score,
    score_slots,
)
from floe_jax.data.tokenizer import (
    encode_docs,
    encode_example,
    encode_examples,
    encode_prompt,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from floe_jax.inference.privacy import PrivacyDetector

SMALL = BenchmarkConfig(
    num_countries=10,
    public_repeats=2,
    num_clients=4,
    contacts_per_client=3,
    test_contacts_per_client=2,
    examples_per_client=12,
    queries_per_type=9,
    format_samples=8,
)


@pytest.fixture(scope="module")
def bench():
    return make_benchmark(SMALL)


def test_same_seed_gives_identical_benchmark(bench):
    again = make_benchmark(SMALL)
    assert again == bench
    assert repr(again).encode() == repr(bench).encode()  # byte-identical text


def test_app_in_prompt_names_the_app_and_changes_only_the_prompts(bench):
    """`app_in_prompt=True` adds an `App:` line naming the query's (or example's) app before
    the note, and changes nothing else: answers, slots, tasks, clients and the corpora."""
    named = make_benchmark(dataclasses.replace(SMALL, app_in_prompt=True))
    assert named.public_docs == bench.public_docs and named.edge_docs == bench.edge_docs
    assert named.format_docs == bench.format_docs  # one tokenizer for both settings
    pairs = [(q, p) for q, p in zip(bench.queries, named.queries, strict=True)]
    pairs += [(e, f) for es, fs in zip(bench.client_examples, named.client_examples, strict=True)
              for e, f in zip(es, fs, strict=True)]  # fmt: skip
    apps = 0
    for plain, with_app in pairs:
        if plain.task == "trivia":
            assert with_app == plain
            continue
        assert with_app == dataclasses.replace(
            plain, prompt=plain.prompt.replace("\nNote: ", f"\nApp: {plain.task}\nNote: ")
        )
        apps += 1
    assert apps > 0


def test_different_seed_gives_different_benchmark(bench):
    other = make_benchmark(dataclasses.replace(SMALL, seed=1))
    assert other.countries != bench.countries
    assert other.public_docs != bench.public_docs
    assert [q.answer for q in other.queries] != [q.answer for q in bench.queries]


def test_sizes_and_task_labels(bench):
    assert len(bench.countries) == SMALL.num_countries
    assert len(bench.local_countries) == SMALL.num_local == 4
    assert bench.num_clients == SMALL.num_clients
    assert set(bench.client_tasks) == set(TASKS)  # clients form task clusters
    for k, examples in enumerate(bench.client_examples):
        assert len(examples) == SMALL.examples_per_client
        assert {e.task for e in examples} <= {*TASKS, "trivia"}
        apps = [e for e in examples if e.task != "trivia"]
        main = sum(e.task == bench.client_tasks[k] for e in apps)
        assert main >= len(apps) // 2  # mostly one app
    for qtype in QUERY_TYPES:
        qs = bench.queries_of(qtype)
        assert len(qs) == SMALL.queries_per_type
        for q in qs:  # an app query is in its client's own app
            assert q.task == ("trivia" if qtype == "general" else bench.client_tasks[q.client])


CARD = r"Contact: (\w+) (\w+) \| phone (555-\d{4}) \| email (\S+) \| home (\w+)\n"


def test_every_answer_follows_from_the_card_the_facts_and_the_app(bench):
    """General answers are public facts; app answers copy the card, state the destination's
    fact, in the asking client's app format; the slots mark exactly those parts."""
    capitals = {c.name: c.capital for c in bench.countries}
    currencies = {c.name: c.currency for c in bench.countries}
    for q in bench.queries:
        for _, value, start in q.slots:
            assert q.answer[start : start + len(value)] == value
        if q.qtype == "general":
            m = re.fullmatch(r"Q: What is the (capital|currency) of (\w+)\?\nA:", q.prompt)
            assert m, q.prompt
            table = capitals if m.group(1) == "capital" else currencies
            assert q.answer == table[m.group(2)] and q.slots == (("general", q.answer, 0),)
            assert any(q.answer in d and m.group(2) in d for d in bench.public_docs)
            continue
        card = re.match(CARD, q.prompt)
        assert card, q.prompt
        first, _, phone, email, _ = card.groups()
        app = q.task
        assert "\nApp: " not in q.prompt  # the format is the client's own convention
        trip = re.search(r"Note: (\w+) travels to (\w+)\.\nA:$", q.prompt)
        assert (trip is not None) == (q.qtype == "both")
        head = {"sms": f"Text {phone}", "mail": f"Mail {email}", "call": f"Call {first} at {phone}"}
        assert q.answer.startswith(head[app])
        personal = [v for k, v, _ in q.slots if k == "personal"]
        assert personal == ([first, phone] if app == "call" else [phone if app == "sms" else email])
        if trip:
            dest = trip.group(2)
            fact = currencies[dest] if app == "mail" else capitals[dest]
            assert [v for k, v, _ in q.slots if k == "general"] == [fact]
            assert q.answer.endswith((f"there is {fact}.", f"there is the {fact}."))
            assert dest not in bench.local_countries  # only the cloud knows it
        else:
            assert not [k for k, _, _ in q.slots if k == "general"]


def test_score_slots_says_which_side_failed(bench):
    q = bench.queries_of("both")[0]
    general = next(v for k, v, _ in q.slots if k == "general")
    personal = next(v for k, v, _ in q.slots if k == "personal")
    assert score_slots(q.answer, q) == {"format": True, "personal": True, "general": True}
    wrong_fact = q.answer[: -len(general) - 1] + "Nowhere."
    assert score_slots(wrong_fact, q) == {"format": True, "personal": True, "general": False}
    redacted = q.answer.replace(personal, "[PHONE]")
    assert score_slots(redacted, q) == {"format": True, "personal": False, "general": True}
    assert score_slots("no idea", q) == {"format": False, "personal": False, "general": False}
    kinds = q.char_kinds()
    assert "".join(c for c, k in zip(q.answer, kinds, strict=True) if k == "general") == general


def test_private_spans_are_listed_and_present(bench):
    for q in bench.queries:
        if q.qtype == "general":
            assert q.private_spans == ()
            continue
        assert len(q.private_spans) == 3  # the card's name, phone and email
        for span in q.private_spans:
            assert span in q.prompt
            assert span in bench.private_terms(q.client)  # the asking client registers them


def test_a_clients_detector_never_holds_back_a_fact_being_generated(bench):
    """People's names and places start with different letters, so while a capital or currency
    is generated piece by piece, no prefix of it looks like the start of a registered contact:
    the cloud keeps seeing the text it is asked to continue."""
    for client in range(bench.num_clients):
        det = PrivacyDetector()
        det.register_terms(bench.private_terms(client))
        for c in bench.countries:
            for value in (c.capital, c.currency, c.name):
                for n in range(1, len(value) + 1):
                    text = f"Text [PHONE]: The capital of Zed is {value[:n]}"
                    assert det.pending(text) == 0 and not det.find(text), (client, value[:n])


def test_the_detector_patterns_catch_every_phone_and_email(bench):
    """What `private_terms` leaves out (phones, emails) the PII patterns find unaided."""
    detector = PrivacyDetector()
    for contacts in bench.client_contacts:
        for c in contacts:
            text = f"Q: reach {c.name} at {c.phone} or {c.email}?"
            found = {(x.kind, x.text) for x in detector.find(text)}
            assert {("phone", c.phone), ("email", c.email)} <= found, text


def test_private_values_stay_out_of_public_text_and_tokenizer_text(bench):
    public = "\n".join(bench.public_docs + bench.edge_docs + bench.format_docs)
    for contacts in bench.client_contacts:
        for c in contacts:
            for v in c.private_values:
                assert v not in public


def test_travel_notes_teach_the_cloud_redacted_trips_not_an_apps_format(bench):
    """The public trip notes end in a fact about the destination (never the card's home), half
    of them anonymised exactly as the guard redacts (so a redacted prompt is text the cloud has
    read), and none writes an app's answer format (that stays private, for the edge to learn)."""
    from floe_jax.data.world import REDACTED, app_answer

    notes = [d for d in bench.public_docs if "\nNote: " in d]
    assert len(notes) == len(bench.countries) * 2 * SMALL.public_repeats
    assert not any("\nNote: " in d for d in bench.edge_docs)
    by_name = {c.name: c for c in bench.countries}
    anon = 0
    for d in notes:
        card, note, reply = d.split("\n")
        dest = by_name[re.fullmatch(r"Note: .+ travels to (\w+)\.", note).group(1)]
        home = re.search(r"\| home (\w+)$", card).group(1)
        assert home != dest.name and reply.endswith((f" {dest.capital}.", f" {dest.currency}."))
        anon += REDACTED["name"] in card
    assert 0.3 < anon / len(notes) < 0.7
    # the guard's own redaction of a contact's card reads as an anonymised note's card
    contact = bench.client_contacts[0][0]
    det = PrivacyDetector()
    det.register_terms(bench.private_terms(0))
    redacted = det.screen(contact.card).text
    assert redacted.startswith(
        f"Contact: {REDACTED['name']} | phone {REDACTED['phone']} | email {REDACTED['email']} |"
    ), redacted
    for app in TASKS:  # every app's format opens with text no note's reply holds
        head = app_answer(contact, app, None)[0].split(contact.first)[0].split(contact.phone)[0]
        head = head.split(contact.email)[0]
        assert not any(d.split("\nA: ")[1].startswith(head) for d in notes), (app, head)


def test_edge_corpus_holds_only_local_facts(bench):
    edge = "\n".join(bench.edge_docs)
    for c in bench.countries:
        assert c.name in edge  # the edge knows every country's name ...
        assert (c.capital in edge) == (c.name in bench.local_countries)  # ... not every fact


def test_every_apps_first_answer_token_is_in_the_edges_pretraining_text():
    """An output embedding no pretraining text trains stays random, and adapters on the
    projections cannot make its token likely: the `sms` answer's first token (` Text`, with its
    space) was such a token, so fused decoding gave the first token to the cloud (w = 0.12)."""
    from experiments.presets import get_preset
    from floe_jax.data.tokenizer import benchmark_tokenizers, encode_docs

    bench = make_benchmark(get_preset("default").bench)  # the default run's tokenizer, corpus
    edge, _ = benchmark_tokenizers(bench)
    seen = set(encode_docs(edge, bench.edge_docs))
    firsts = {ex.task: edge.encode(ex.response, add_special_tokens=False)[0]
              for exs in bench.client_examples for ex in exs}  # fmt: skip
    assert {"sms", "mail", "call"} <= set(firsts)
    assert all(t in seen for t in firsts.values()), {
        app: edge.decode([t]) for app, t in firsts.items() if t not in seen
    }


def test_held_out_contacts_are_not_in_training_examples(bench):
    train_text = "\n".join(e.prompt for e in bench.pooled_examples())
    for q in bench.queries_of("both") + bench.queries_of("personal"):
        assert q.private_spans[0] not in train_text


def test_the_facts_test_queries_ask_for_are_only_public(bench):
    """No client's examples and no edge pretraining text state a fact a test query asks for:
    only the cloud, pretrained on the public corpus, can know it."""
    private = "\n".join(e.prompt + e.response for e in bench.pooled_examples())
    edge = "\n".join(bench.edge_docs)
    asked = {f[0] for q in bench.queries for f in q.facts}
    assert asked and not asked & set(bench.local_countries)
    for c in bench.countries:
        if c.name in asked:
            for text in (private, edge):
                for value in (c.capital, c.currency):
                    assert not re.search(rf"\b{value}\b", text), value


def test_score_exact_match_per_type():
    qs = [
        Query("p", "Velmar", "general", "trivia", 0, ()),
        Query("p", "Kron", "general", "trivia", 0, ()),
        Query("p", "555-0142", "personal", "contact", 1, ("555-0142",)),
        Query("p", "The capital of Zorbia is Velmar.", "both", "travel", 1, ()),
    ]
    preds = [" Velmar\n", "kron", "555-0142", "The capital of  Zorbia is Velmar."]
    s = score(preds, qs)
    assert s["general"] == 0.5  # case matters: exact match
    assert s["personal"] == 1.0
    assert s["both"] == 1.0  # whitespace is normalised
    assert s["overall"] == 0.75
    assert (s["n_general"], s["n_personal"], s["n_both"], s["n_overall"]) == (2, 1, 1, 4)
    assert s["slot_format"] == 1.0  # without slots the format is the whole answer
    with pytest.raises(ValueError, match="2 predictions for 4 queries"):
        score(preds[:2], qs)


def test_bad_benchmark_config_names_the_field():
    with pytest.raises(ConfigError, match="num_clients"):
        BenchmarkConfig(num_clients=0)
    with pytest.raises(ConfigError, match="edge_fact_fraction"):
        BenchmarkConfig(edge_fact_fraction=1.5)
    with pytest.raises(ConfigError, match="app_in_prompt must be true or false"):
        BenchmarkConfig(app_in_prompt="no")  # a string is truthy: never taken as False


def test_no_country_left_for_the_cloud_is_a_clear_error():
    with pytest.raises(ConfigError, match="edge_fact_fraction=1.0 leaves no country"):
        BenchmarkConfig(edge_fact_fraction=1.0)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok_dir(bench, tmp_path_factory):
    tok = train_tokenizer(list(bench.public_docs) + list(bench.format_docs), vocab_size=300)
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, path)
    return path


def test_tokenizer_round_trips_through_auto_tokenizer(bench, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == 300
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for q in bench.queries:  # private values never seen by the trainer still round trip
        text = q.prompt + " " + q.answer
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert load_tokenizer(tok_dir).get_vocab() == tok.get_vocab()


def test_edge_and_cloud_tokenizers_differ_and_align(bench):
    """The cloud's tokenizer is its own (public text only, another size); the string alignment
    maps its tokens onto the edge's, special tokens by role."""
    from floe_jax.data.tokenizer import benchmark_tokenizers
    from floe_jax.inference.align import StringMapper, build_map, vocab_of

    edge, cloud = benchmark_tokenizers(bench, edge_vocab_size=320, cloud_vocab_size=290)
    assert (len(edge), len(cloud)) == (320, 290)
    assert edge.get_vocab() != cloud.get_vocab()
    cov = build_map(vocab_of(cloud), vocab_of(edge)).coverage()
    assert cov["mapped"] == 1.0 and cov["exact"] > 0.9, cov
    mapper = StringMapper(vocab_of(edge))
    assert mapper(cloud.decode([cloud.eos_token_id])) == edge.eos_token_id  # "<eos>" by role
    q = bench.queries_of("both")[0]
    for i in cloud.encode(" " + q.answer, add_special_tokens=False):
        piece = cloud.decode([i])
        assert edge.decode([mapper(piece)]) == piece  # every answer piece has its edge token


def test_encode_helpers(bench, tok_dir):
    tok = load_tokenizer(tok_dir)
    ex = bench.client_examples[0][0]
    ids, mask = encode_example(tok, ex.prompt, ex.response)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len(mask)
    n_prompt = len(encode_prompt(tok, ex.prompt))
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tok.decode(ids[n_prompt:-1]) == ex.response
    stream = encode_docs(tok, bench.public_docs[:3])
    assert stream.count(tok.bos_token_id) == stream.count(tok.eos_token_id) == 3


def test_encode_examples_pads_right_and_masks_the_response(bench, tok_dir):
    tok = load_tokenizer(tok_dir)
    exs = bench.client_examples[0][:3]
    out = encode_examples(tok, [(e.prompt, e.response) for e in exs])
    enc = [encode_example(tok, e.prompt, e.response) for e in exs]
    longest = max(len(t) for t, _ in enc)
    assert out["tokens"].shape == (3, -(-longest // 16) * 16)
    for i, (ids, m) in enumerate(enc):
        assert out["tokens"][i, : len(ids)].tolist() == ids
        assert (out["tokens"][i, len(ids) :] == tok.pad_token_id).all()
        assert out["mask"][i].tolist() == [1] * len(ids) + [0] * (out["mask"].shape[1] - len(ids))
        assert (
            out["loss_mask"][i, : len(m)].tolist() == m and out["loss_mask"][i, len(m) :].sum() == 0
        )
    with pytest.raises(ValueError, match="seq_len=4"):
        encode_examples(tok, [(exs[0].prompt, exs[0].response)], seq_len=4)


def test_encoders_without_a_bos_token():
    """A tokenizer without BOS (Qwen's): prompts start with their own tokens."""

    class NoBos:
        bos_token_id, eos_token_id = None, 9

        def encode(self, text, add_special_tokens):
            assert not add_special_tokens
            return [len(w) for w in text.split()]

    assert encode_prompt(NoBos(), "ab c") == [2, 1]
    assert encode_example(NoBos(), "ab c", "dddd") == ([2, 1, 4, 9], [0, 0, 1, 1])


def test_load_tokenizer_round_trip(tmp_path):
    """A checkpoint's tokenizer (not the benchmark's) loads through the same loader."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = ["the edge model answers fast", "the cloud model answers well", "private data stays"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    ids = loaded("the cloud answers")["input_ids"]
    assert ids == tok.encode("the cloud answers").ids
    assert loaded.decode(ids) == "the cloud answers"
    assert loaded.eos_token == "</s>" and loaded.eos_token_id == tok.token_to_id("</s>")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_load_tokenizer_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
