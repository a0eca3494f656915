"""Environments and tools (rlhf.core.environments): tool-call parsing in both formats and its
errors, the tool environment, malformed steps, raising and hanging environments under a
deadline, and token-in-token-out observations through the tiny model's chat template
(the conversation kept as ids decodes to what the template renders, nothing the model
wrote is re-tokenised)."""

import time

import pytest

from rlhf.core.environments import (ChatCodec, EnvironmentFailure, Step, ToolCallError, call_all,
                               checked_step, load_environment, parse_tool_calls)


def test_tool_calls_are_parsed_in_both_formats():
    calls = parse_tool_calls('I will look. <tool_call>{"name": "open_box", "arguments": '
                             '{"id": 3}}</tool_call> and <tool_call>\n{"name": "x", '
                             '"arguments": "{\\"a\\": 1}"}\n</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("open_box", {"id": 3}), ("x", {"a": 1})]
    llama = parse_tool_calls(' {"name": "search", "parameters": {"q": "owls"}} ')
    assert [(c.name, c.arguments) for c in llama] == [("search", {"q": "owls"})]
    assert parse_tool_calls("The box holds a plum.") == []
    assert parse_tool_calls('{"just": "json"}') == []
    for bad, why in (('<tool_call>{"name": 1}</tool_call>', "name"),
                     ('<tool_call>{"name": "a" </tool_call>', "not JSON"),
                     ('<tool_call>{"name": "a", "arguments": [1]}</tool_call>', "object"),
                     ('<tool_call>{"name": "a"}', "not closed")):
        with pytest.raises(ToolCallError, match=why):
            parse_tool_calls(bad)


def test_the_tool_demo_rewards_only_answers_after_the_tool():
    make = load_environment("rlhf.core.tasks:BoxLookupEnv")
    env = make()
    env.reset({"answer": "plum", "prompt": "What is in the box?"})
    assert env.name == "rlhf.core.tasks:BoxLookupEnv"
    call = '<tool_call>{"name": "open_box", "arguments": {}}</tool_call>'
    assert env.step(call) == Step("a plum", 0.0, False)
    assert env.step("The box holds a plum.") == Step("", 1.0, True)
    lucky = make()  # a right guess without the tool earns nothing
    lucky.reset({"answer": "plum"})
    assert lucky.step("The box holds a plum.").reward == 0.0
    wrong = make()
    wrong.reset({"answer": "plum"})
    assert "no tool named 'dig'" in wrong.step(
        '<tool_call>{"name": "dig", "arguments": {}}</tool_call>').observation
    assert "unexpected keyword" in wrong.step(
        '<tool_call>{"name": "open_box", "arguments": {"x": 1}}</tool_call>').observation
    with pytest.raises(ValueError, match="module:class, e.g. rlhf.core.tasks:BoxLookupEnv"):
        load_environment("rlhf.core.tasks.BoxLookupEnv")
    with pytest.raises(ValueError, match="no class 'Nope'"):
        load_environment("rlhf.core.tasks:Nope")
    assert load_environment("rlhf.core.tasks:BoxLookupEnv", {"latency_s": 0.5})().latency_s == 0.5


def test_failures_are_named_and_nothing_waits_past_the_deadline():
    assert checked_step("e", Step("obs", 1, False)) == Step("obs", 1.0, False)
    for out, why in ((("obs", 1.0, True), "returned tuple"), (Step(3), "must be a string"),
                     (Step("", float("nan")), "nan"), (Step("", "x"), "not a number"),
                     (Step("", 0.0, True, "robot"), "role 'robot'")):
        with pytest.raises(EnvironmentFailure, match=why) as e:
            checked_step("my:Env", out)
        assert e.value.env == "my:Env" and e.value.kind == "malformed step"

    def boom():
        raise KeyError("answer")

    t0 = time.monotonic()
    out = call_all([("ok:Env", lambda: 1), ("slow:Env", lambda: time.sleep(30)),
                    ("bad:Env", boom)], timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    assert out[0] == (True, 1)
    assert not out[1][0] and out[1][1].kind == "timeout" and "slow:Env" in str(out[1][1])
    assert not out[2][0] and out[2][1].kind == "raised" and "KeyError" in str(out[2][1])


def test_observations_are_appended_token_in_token_out(tokenizer):
    codec = ChatCodec(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in codec.stop_ids and tokenizer.eos_token_id in codec.stop_ids
    assert codec.closing == "<|end|>\n"
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    messages = [{"role": "user", "content": "What is in the box?"}]
    prompt = enc(tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True))
    # the model's turn as it sampled it, including a split no tokenizer would make
    turn = enc('<tool_call>{"name": "open_box"') + enc(', "arguments": {}}</tool_call>') + [end]
    obs = codec.observation_ids(turn, "tool", "a plum")
    answer = enc("The box holds a plum.") + [end]
    ids = prompt + turn + obs + answer
    assert ids[:len(prompt) + len(turn)] == prompt + turn  # nothing before is touched
    rendered = tokenizer.apply_chat_template(messages + [
        {"role": "assistant", "content": '<tool_call>{"name": "open_box", "arguments": {}}'
                                         '</tool_call>'},
        {"role": "tool", "content": "a plum"},
        {"role": "assistant", "content": "The box holds a plum."}], tokenize=False)
    assert tokenizer.decode(ids) + "\n" == rendered
    # a turn cut before its end token: the closing is appended in full
    cut = codec.observation_ids(enc("I will"), "user", "go on")
    assert tokenizer.decode(cut).startswith("<|end|>\n<|user|>\ngo on<|end|>\n<|assistant|>")
