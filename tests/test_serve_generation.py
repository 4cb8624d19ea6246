"""Served generation: answers on one base take turns a token at a time (StepDecoder + TokenScheduler).

The decoder must give `generate`'s tokens (greedy and seeded sampling), answers interleaved on one base
must each equal their answer alone, and a client that leaves must free the rotation.
"""
from __future__ import annotations

import asyncio
import shutil
import time

import pytest

import headstart
from headstart.llm.decode import StepDecoder
from headstart.llm.decode_batch import answer_all
from headstart.llm.generate import _marker_as_text, generate
from headstart.serve.app import make_app
from headstart.serve.token_scheduler import scheduler_for
from test_serve import generators  # noqa: F401  (the fixture is found by name: two adapters on one tiny-llm)

CHAT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What is the colour of coal?"}]
LONG = dict(max_new_tokens=24, temperature=1.0, repetition_penalty=1.0)  # sampled: rambles on the tiny LM


def decode_all(model, tokenizer, prompt, **options) -> tuple[str, list[str]]:
    pieces: list[str] = []
    decoder = StepDecoder(model, tokenizer, prompt, stream=pieces.append, **options)
    while not decoder.done:
        decoder.step()
    return decoder.answer(), pieces


@pytest.mark.parametrize("options", [dict(temperature=0, max_new_tokens=12),
                                     dict(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=12),
                                     dict(temperature=1.0, repetition_penalty=1.0, seed=11, max_new_tokens=12)])
def test_the_step_decoder_gives_generates_answer_token_for_token(generators, options):
    spec = headstart.load(generators / "colour-chat")
    for prompt in ("What is the colour of snow?", CHAT):
        want = generate(spec.model, spec.tokenizer, prompt, **options)
        answer, pieces = decode_all(spec.model, spec.tokenizer, prompt, **options)
        assert answer == want and "".join(pieces) == answer


def test_the_step_decoder_stops_on_the_end_of_turn_marker_as_text_as_generate_does():
    from headstart.bases.tiny import byte_tokenizer

    lm = headstart.load_base("tiny-llm").lm.eval()
    # 259 ids as tiny-llm's, but no chat template and no `<|im_end|>` token: the ChatML marker is plain text
    tokenizer = byte_tokenizer(["<pad>", "<s>", "</s>"], pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert _marker_as_text(tokenizer) and len(tokenizer) == lm.config.vocab_size
    for options in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        want = generate(lm, tokenizer, "What is the colour of snow?", max_new_tokens=16, **options)
        answer, pieces = decode_all(lm, tokenizer, "What is the colour of snow?", max_new_tokens=16, **options)
        assert answer == want and "".join(pieces) == answer


@pytest.fixture(scope="module")
def other_chat(generators):
    """colour-chat with its LoRA weights moved (seeded noise): a second adapter that answers differently."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = generators / "other-chat"
    if not folder.exists():
        shutil.copytree(generators / "colour-chat", folder)
        weights = folder / "adapter" / "adapter_model.safetensors"
        tensors = load_file(weights)
        noise = torch.Generator().manual_seed(0)
        save_file({k: v + 0.5 * torch.randn(v.shape, generator=noise) for k, v in tensors.items()}, weights)
    return folder


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0.9, seed=3)], ids=["greedy", "seeded"])
def test_batched_steps_give_each_answer_its_lone_tokens(generators, options):
    spec = headstart.load(generators / "colour-chat")
    prompts = ["Tell me about snow.", CHAT, "What is the colour of grass? Answer at length, please."]
    alone = [decode_all(spec.model, spec.tokenizer, p, max_new_tokens=20, **options)[0] for p in prompts]
    assert answer_all(spec.model, spec.tokenizer, prompts, together=3, max_new_tokens=20, **options) == alone


def test_answer_all_takes_waiting_prompts_as_answers_finish_and_reports_each(generators):
    spec = headstart.load(generators / "colour-chat")
    prompts = ["Tell me about snow.", CHAT, "Hi", "What is the colour of grass? Answer at length, please.", "Sky?"]
    options = dict(temperature=0, max_new_tokens=16)
    alone = [generate(spec.model, spec.tokenizer, p, **options) for p in prompts]
    reported: dict[int, str] = {}
    assert answer_all(spec.model, spec.tokenizer, prompts, together=2, on_answer=reported.__setitem__,
                      **options) == alone
    assert reported == dict(enumerate(alone))
    with pytest.raises(ValueError, match="together"):
        answer_all(spec.model, spec.tokenizer, prompts, together=0)


def served_pair(generators, other_chat):
    app = make_app([generators / "colour-chat", other_chat], token=None)
    registry = app.state.registry
    return registry.get("colour-chat"), registry.get("other-chat")


async def timed_pieces(served, prompt, log: list, **options) -> str:
    """The answer streamed, each piece logged as (served id, time it came)."""
    out = []
    async for piece in served.stream(prompt, **options):
        log.append((served.id, time.perf_counter()))
        out.append(piece)
    return "".join(out)


@pytest.mark.parametrize("max_batch", [1, 8], ids=["turns", "batched"])
def test_two_streams_on_one_base_interleave_and_each_answers_as_it_does_alone(generators, other_chat, max_batch):
    chat, chat2 = served_pair(generators, other_chat)
    scheduler_for(chat._generator_base).max_batch = max_batch
    assert chat._generator_base is chat2._generator_base
    alone = [headstart.load(folder).generate(prompt, seed=seed, **LONG)
             for folder, prompt, seed in ((generators / "colour-chat", "Tell me about snow.", 1), (other_chat, CHAT, 2))]
    swapped = headstart.load(other_chat).generate("Tell me about snow.", seed=1, **LONG)
    assert swapped != alone[0]  # the adapters differ: an answer run through the wrong one would show
    log: list = []

    async def both():
        first = asyncio.create_task(timed_pieces(chat, "Tell me about snow.", log, seed=1, **LONG))
        while not log:  # the first answer is under way before the second is asked
            await asyncio.sleep(0.001)
        second = await timed_pieces(chat2, CHAT, log, seed=2, **LONG)
        return await first, second

    forwards = scheduler_for(chat._generator_base).batched_forwards
    answers = asyncio.run(both())
    assert list(answers) == alone
    batched = scheduler_for(chat._generator_base).batched_forwards > forwards  # rows of two adapters, one forward
    assert batched == (max_batch > 1)
    order = [who for who, _ in log]
    first_of_second = order.index("other-chat")
    last_of_first = len(order) - 1 - order[::-1].index("colour-chat")
    assert first_of_second < last_of_first, f"no interleaving: {order}"


def test_seeded_sampling_gives_the_same_answer_alone_and_beside_another_stream(generators, other_chat):
    chat, chat2 = served_pair(generators, other_chat)
    options = dict(seed=7, temperature=0.9, top_p=0.95, max_new_tokens=16)

    async def alone():
        return await chat.complete("What is the colour of grass?", **options)

    async def beside():
        other = asyncio.create_task(chat2.complete("Tell me about coal.", seed=99, **LONG))
        mine = await chat.complete("What is the colour of grass?", **options)
        await other
        return mine

    by_itself = asyncio.run(alone())
    assert by_itself == asyncio.run(beside())
    assert by_itself == headstart.load(generators / "colour-chat").generate("What is the colour of grass?", **options)


def test_a_client_that_leaves_frees_the_rotation_at_its_next_turn(generators, other_chat, monkeypatch):
    chat, chat2 = served_pair(generators, other_chat)
    scheduler = scheduler_for(chat._generator_base)
    submitted = []
    submit = scheduler.submit
    monkeypatch.setattr(scheduler, "submit", lambda turn: (submitted.append(turn), submit(turn))[1])
    options = dict(max_new_tokens=400, temperature=1.0, repetition_penalty=1.0, seed=4)  # runs all 400 alone
    beside = dict(max_new_tokens=60, temperature=1.0, repetition_penalty=1.0, seed=2)

    async def leave_after_one_piece():
        other = asyncio.create_task(chat2.complete(CHAT, **beside))  # stepped in the same batches
        stream = chat.stream("Tell me a long story.", **options)
        await stream.__anext__()
        await stream.aclose()  # what the server does when the client disconnects
        answer = await other
        for _ in range(100):  # the neighbour's last piece comes a moment before the worker drops it
            if scheduler.active == 0:
                break
            await asyncio.sleep(0.01)
        return answer

    other_answer = asyncio.run(leave_after_one_piece())
    left = next(turn for turn in submitted if turn.decoder.max_new_tokens == 400)
    assert scheduler.active == 0 and len(left.decoder.new_ids) < 100  # gone at its next turn, not 400 tokens later
    assert other_answer == headstart.load(other_chat).generate(CHAT, **beside)  # the neighbour went on unharmed
    # the rotation still serves the next answer
    assert asyncio.run(chat2.complete(CHAT, temperature=0.0, max_new_tokens=6)) == \
        headstart.load(other_chat).generate(CHAT, temperature=0.0, max_new_tokens=6)


@pytest.mark.real
def test_the_step_decoder_alone_and_batched_gives_generates_answers_on_real_smollm2():
    from headstart.llm.model import load_lm

    lm, tokenizer, _ = load_lm("smollm2-135m")
    lm.eval()
    prompts = ["Name three fruits.", "Give three tips for staying healthy.", "What is the capital of France?"]
    for options in (dict(temperature=0), dict(temperature=0.8, seed=5)):
        want = [generate(lm, tokenizer, p, max_new_tokens=24, **options) for p in prompts]
        answer, pieces = decode_all(lm, tokenizer, prompts[0], max_new_tokens=24, **options)
        assert answer == want[0] and "".join(pieces) == answer
        assert answer_all(lm, tokenizer, prompts, together=3, max_new_tokens=24, **options) == want
