"""Hugging Face transformers interop (protperf.hf): Auto classes, equal logits, round trips, and
a real fine-tune with transformers.Trainer. Offline: the Hub is never contacted."""

from __future__ import annotations

import gzip
import subprocess
import sys

import pytest
import torch
import transformers
from lm_models import export_random_model

import protperf
from protperf import cli, hf, tokenizer

PROTEINS = ["MKTAYIAKQRQISFVKSHFSRQ", "MALWMRLLPLLALLALWGPD", "MSL"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
def test_export_loads_with_the_auto_classes_and_gives_protperf_logits(causal, tmp_path):
    export = export_random_model(tmp_path / "export", seed=2, causal=causal)
    model = protperf.load_model(export)
    folder = tmp_path / "hf"
    assert cli.main(["export", str(export), str(folder), "--format", "hf"]) == 0
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    loaded = auto.from_pretrained(folder)
    expected = hf.PerformerLMForCausalLM if causal else hf.PerformerLMForMaskedLM
    assert type(loaded) is expected and not loaded.training
    assert isinstance(transformers.AutoConfig.from_pretrained(folder), hf.PerformerLMConfig)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoded = hf_tokenizer(PROTEINS, padding=True, return_tensors="pt")
    tokens, padding = tokenizer.batch_encode(PROTEINS)
    assert torch.equal(encoded["input_ids"], tokens)
    assert torch.equal(encoded["attention_mask"] == 0, padding)
    with torch.no_grad():
        ours = model(tokens, padding)["logits"]
        theirs = loaded(**encoded).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    # save_pretrained / from_pretrained round trip: the same weights, ties kept.
    loaded.save_pretrained(tmp_path / "again")
    again = auto.from_pretrained(tmp_path / "again")
    for (name, a), b in zip(loaded.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert again.performer.head.weight is again.performer.embed.weight
    assert again.config.to_performer_config() == model.config


def test_causal_loss_is_protperfs_next_token_loss(tmp_path):
    model = protperf.load_model(export_random_model(tmp_path / "export", seed=4, causal=True))
    wrapped = hf.to_hf(model)
    tokens, padding = tokenizer.batch_encode(PROTEINS)
    attention_mask = (~padding).long()
    targets = tokens[:, 1:].masked_fill(padding[:, 1:], -100)
    with torch.no_grad():
        ours = model(tokens[:, :-1], padding[:, :-1], targets=targets)["loss"]
        theirs = wrapped(tokens, attention_mask=attention_mask, labels=tokens).loss
    torch.testing.assert_close(theirs, ours)


def _proteins(proteome_dir, count: int) -> list[str]:
    source = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    with gzip.open(source, "rt") as handle:
        records = handle.read().split(">")[1 : count + 1]
    return ["".join(record.splitlines()[1:])[:120] for record in records]


def test_fine_tune_with_the_transformers_trainer(proteome_dir, tmp_path):
    """A few steps of transformers.Trainer with its own causal-LM collator: the loss falls, and
    the fine-tuned weights come back into protperf unchanged."""
    torch.manual_seed(0)
    model = protperf.load_model(export_random_model(tmp_path / "export", seed=5, causal=True))
    folder = hf.save_hf(model, tmp_path / "hf")
    network = transformers.AutoModelForCausalLM.from_pretrained(folder)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    dataset = [hf_tokenizer(sequence) for sequence in _proteins(proteome_dir, 32)]
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=12, per_device_train_batch_size=8,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=network,
        args=arguments,
        train_dataset=dataset,
        data_collator=transformers.DataCollatorForLanguageModeling(hf_tokenizer, mlm=False),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2  # it learns (random init: about 3.4 -> 2.9)
    tuned = network.performer.cpu().eval()
    tokens, padding = tokenizer.batch_encode(PROTEINS)
    with torch.no_grad():
        assert not torch.allclose(
            tuned(tokens, padding)["logits"], model(tokens, padding)["logits"]
        )
    back = hf.to_hf(tuned)  # and protperf reads the fine-tuned model as its own
    for (name, a), b in zip(tuned.state_dict().items(), back.performer.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_protperf_works_without_transformers(proteome_dir, tmp_path):
    """The core package never imports transformers: embedding from the command line leaves it
    unimported, and with it missing protperf.hf says how to install it."""
    export = export_random_model(tmp_path / "export", seed=6)
    fasta = tmp_path / "few.fasta"
    fasta.write_text("".join(f">p{i}\n{sequence}\n" for i, sequence in enumerate(PROTEINS)))
    embed = f"""
import sys
from protperf import cli
status = cli.main(["embed", {str(fasta)!r}, "--model", {str(export)!r}, "-o", {str(tmp_path / "e.h5")!r}])
print(status, "transformers" in sys.modules)
"""
    missing = """
import sys
sys.modules["transformers"] = None  # as if it were not installed
try:
    import protperf.hf
except ImportError as error:
    print(error)
"""
    for code, expected in (
        (embed, ["0 False"]),
        (missing, ["protperf.hf needs Hugging Face transformers: pip install 'protperf[hf]'"]),
    ):
        completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.splitlines()[-len(expected) :] == expected
