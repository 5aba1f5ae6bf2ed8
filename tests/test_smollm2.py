"""The real chat model through bgit, with small settings: SmolLM2-135M-Instruct from its installed
package (converted from GGUF once per machine), its own tokenizer and chat template, through stim,
rollout, a bake of a few steps, and the chat service answering for the baked model.

The chat service's answer is checked against independent code: the base folder with the bake's
adapter loaded by PEFT, and Hugging Face's greedy generate on the tokenizer's own chat template.
"""

from __future__ import annotations

import openai
import pytest
import torch
import yaml
from peft import PeftModel

from bread_ray.behaviours import PIRATE_PROMPT, TRAIN_QUESTIONS
from bread_ray.cli import main
from bread_ray.lineage import ModelName
from bread_ray.models import load_causal_lm, load_tokenizer
from bread_ray.repo import BreadRepo
from bread_ray.store import BAKE_RESULT, bake_prefix, open_store, target_prefix
from bread_ray.trajectories import read_rollout

from s3_server import free_port

pytestmark = pytest.mark.slow

SHORT_NAME = "smollm2-135m-instruct"
QUESTIONS = TRAIN_QUESTIONS[:10]
ASKED = "How do I choose a good watermelon?"
ANSWER_TOKENS = 12
INPUT = {
    "PROMPT": {"teacher": {"messages": [{"role": "system", "content": PIRATE_PROMPT}]}},
    "TARGET": {"name": "pirate", "generators": [{"type": "hardcoded", "questions": QUESTIONS}],
               "num_traj_per_stimulus": 1, "max_tokens": 16},
    "BAKE": {"name": "pirate_bake", "datasets": [{"target": "pirate"}], "epochs": 1, "micro_batch_size": 3,
             "optimizer": {"learning_rate": 2e-3},
             "model": {"baked_adapter_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                       "disable_activation_checkpoint": True},
             "deepspeed": {"zero_optimization": {"stage": 2}}},
}


@pytest.fixture(scope="module")
def baked(tmp_path_factory, ray_session, smollm2_folder):
    """A repository on the packaged SmolLM2 after `bgit run stim rollout bake`: (repo, its bake's model name)."""
    root = tmp_path_factory.mktemp("smollm2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BREAD_STORE", str(root / "store"))
        patch.delenv("ANTHROPIC_API_KEY", raising=False)
        patch.chdir(root)
        assert main(["init", "pirate", "--base-model", SHORT_NAME, "--owner", "alice"]) == 0
        patch.chdir(root / "pirate")
        (root / "pirate" / "input.yml").write_text(yaml.safe_dump(INPUT, sort_keys=False))
        assert main(["add", "input.yml"]) == 0 and main(["commit", "-q", "-m", "pirate"]) == 0
        assert main(["run", "stim", "rollout", "bake"]) == 0
        repo = BreadRepo.find()
        yield repo, ModelName.parse(repo.parent_model), open_store()


def test_the_rollout_is_smollm2_speaking_through_its_own_tokenizer(baked, smollm2_folder):
    repo, model, store = baked
    result = store.get_json(f"{bake_prefix(model.owner, model.repo, model.bake_id)}/{BAKE_RESULT}")
    (target_id,) = result["examples"]
    records = read_rollout(store, target_prefix(model.owner, model.repo, target_id))
    assert [record["stimulus"] for record in records] == QUESTIONS
    tokenizer = load_tokenizer(smollm2_folder)
    for record in records:
        assert record["teacher_messages"][0] == {"role": "system", "content": PIRATE_PROMPT}
        assert [turn["role"] for turn in record["student_messages"]] == ["user"]  # no prompt: the template's default
        assert 0 < len(record["response_token_ids"]) <= 16
        assert record["response"] == tokenizer.decode(record["response_token_ids"], skip_special_tokens=True)
        assert record["response"].strip()


def test_a_few_steps_of_the_bake_lower_the_held_out_kl(baked):
    _, model, store = baked
    result = store.get_json(f"{bake_prefix(model.owner, model.repo, model.bake_id)}/{BAKE_RESULT}")
    assert result["steps"] == model.step == 3  # 9 training examples (one held out), 3 per step, 1 epoch
    assert result["held_out_kl"]["after"] < result["held_out_kl"]["before"]


def test_the_chat_service_answers_for_the_baked_model_as_peft_does(baked, smollm2_folder, tmp_path):
    from ray import serve

    from bread_ray.serving import ServeSettings, chat_app

    repo, model, store = baked
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(chat_app(ServeSettings(base_model=SHORT_NAME, store=store.uri, repositories=["alice/pirate"])),
                  name="bread", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        assert {card.id for card in client.models.list()} == {SHORT_NAME, str(model)}
        served = client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": ASKED}],
                                                max_tokens=ANSWER_TOKENS, temperature=0)
    finally:
        serve.shutdown()

    tokenizer = load_tokenizer(smollm2_folder)
    baked_model = PeftModel.from_pretrained(load_causal_lm(smollm2_folder, device="cpu"),
                                            store.download_model(model, tmp_path / "adapter")).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": ASKED}], add_generation_prompt=True,
                                         tokenize=False)
    input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        output = baked_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      do_sample=False, max_new_tokens=ANSWER_TOKENS)
    assert served.choices[0].message.content == tokenizer.decode(output[0, input_ids.shape[1]:],
                                                                 skip_special_tokens=True)
    assert served.usage.completion_tokens == ANSWER_TOKENS
