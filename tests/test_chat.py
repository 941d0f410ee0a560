"""k2jax.chat: golden renderings of K2's chat format, the built-in renderer against jinja2 rendering
of the shipped template, the loss mask of encode_chat, and tool calls parsed back out."""

import json
import re

import numpy as np
import pytest

from k2jax import chat, data
from k2jax.data import tokenizers

SYSTEM = ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
          "<|im_end|>")
WEATHER = {"type": "function", "function": {
  "name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Web search «quoted»",
                                           "parameters": {"type": "object", "properties": {}}}}
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "Weather '
                'in a city", "parameters": {"type": "object", "properties": {"city": {"type": '
                '"string"}}, "required": ["city"]}}}')
SEARCH_JSON = ('{"type": "function", "function": {"name": "search", "description": "Web search '
               '«quoted»", "parameters": {"type": "object", "properties": {}}}}')
PRAHA = [
  {"role": "user", "content": "Jaké je počasí v Praze?"},
  {"role": "assistant", "content": None, "tool_calls": [
    {"id": "functions.get_weather:0", "type": "function",
     "function": {"name": "get_weather", "arguments": {"city": "Praha"}}}]},
  {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "12 °C, déšť"},
  {"role": "assistant", "content": "V Praze je 12 °C a prší."},
]
TWO_CALLS = {"role": "assistant", "content": "Let me check.", "tool_calls": [
  {"id": "functions.get_weather:0", "type": "function",
   "function": {"name": "get_weather", "arguments": '{"city":"Praha"}'}},
  {"id": "functions.search:1", "type": "function",
   "function": {"name": "search", "arguments": {"q": "zprávy", "n": 3}}}]}
TOOLS_CHAT = [
  {"role": "system", "content": "You are a helper."},
  {"role": "user", "content": "Weather in Praha and news?"},
  TWO_CALLS,
  {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
   "content": "12 °C"},
  {"role": "tool", "tool_call_id": "functions.search:1",
   "content": [{"type": "text", "text": "No news."}]},
]
TWO_CALLS_TEXT = (
  "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
  '<|tool_call_argument_begin|>{"city":"Praha"}<|tool_call_end|><|tool_call_begin|>'
  'functions.search:1<|tool_call_argument_begin|>{"q": "zprávy", "n": 3}<|tool_call_end|>'
  "<|tool_calls_section_end|>")
NAMED = [
  {"role": "system", "name": "rules", "content": "Be brief."},
  {"role": "user", "name": "alice",
   "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
  {"role": "assistant", "name": "kimi", "content": "ok"},
]
# (messages, tools, add_generation_prompt, K2's rendering), written from the format description.
GOLDEN = [
  ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None, False,
   SYSTEM + "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>Hello!"),
  ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None, True,
   SYSTEM + "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>Hello!"
   "<|im_end|><|im_assistant|>assistant<|im_middle|>"),
  ([{"role": "user", "content": "Hi"}], None, True,
   SYSTEM + "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>"),
  (NAMED, None, True,
   "<|im_system|>rules<|im_middle|>Be brief.<|im_end|><|im_user|>alice<|im_middle|>Part one. "
   "Part two.<|im_end|><|im_assistant|>kimi<|im_middle|>ok<|im_end|>"
   "<|im_assistant|>assistant<|im_middle|>"),
  (TOOLS_CHAT, [WEATHER, SEARCH], True,
   f"<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  [{WEATHER_JSON}, {SEARCH_JSON}]<|im_end|>"
   "<|im_system|>system<|im_middle|>You are a helper.<|im_end|><|im_user|>user<|im_middle|>"
   "Weather in Praha and news?<|im_end|><|im_assistant|>assistant<|im_middle|>" + TWO_CALLS_TEXT +
   "<|im_end|><|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
   "    12 °C<|im_end|><|im_system|>tool<|im_middle|>## Return of functions.search:1\n"
   "    No news.<|im_end|><|im_assistant|>assistant<|im_middle|>"),
  (PRAHA, [WEATHER], False,
   '<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  [{"type": "function", "function": '
   '{"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", '
   '"properties": {"city": {"type": "string"}}, "required": ["city"]}}}]<|im_end|><|im_system|>'
   "system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|><|im_user|>"
   "user<|im_middle|>Jaké je počasí v Praze?<|im_end|><|im_assistant|>assistant<|im_middle|>"
   "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
   '<|tool_call_argument_begin|>{"city": "Praha"}<|tool_call_end|><|tool_calls_section_end|>'
   "<|im_end|><|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n    12 °C, "
   "déšť<|im_end|><|im_assistant|>assistant<|im_middle|>V Praze je 12 °C a prší."),
]


@pytest.mark.parametrize("case", range(len(GOLDEN)))
def test_render_matches_the_golden_string_and_the_jinja_template(case):
  messages, tools, add_generation_prompt, want = GOLDEN[case]
  assert chat.render(messages, tools, add_generation_prompt) == want
  template = tokenizers.k2_chat_template()
  for prompt in (False, True):
    assert (chat.render(messages, tools, prompt, template=template)
            == chat.render(messages, tools, prompt))


def test_a_checkpoint_template_is_used_as_transformers_would(tmp_path):
  tok = data.train_bpe(["some text to merge " * 20], 520)
  tok.save(tmp_path)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["chat_template"] = ("{% for m in messages %}\n  {% if m.role %}[{{ m['role'] }}]"
                             "{% endif %}{{ m | tojson }}\n{% endfor %}"
                             "{% if add_generation_prompt %}>{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  template = data.KimiTokenizer.from_dir(tmp_path).chat_template
  got = chat.render([{"role": "user", "content": "é"}], add_generation_prompt=True,
                    template=template)
  assert got == '[user]{"role": "user", "content": "é"}\n>'  # lstrip/trim blocks, tojson.


@pytest.fixture(scope="module")
def tok():
  texts = [g[3] for g in GOLDEN] * 3 + ["final answer, done. " * 20]
  return data.train_bpe(texts, 800)


def _runs(mask):
  """[start, stop) of each run of ones."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return list(zip(edges[::2], edges[1::2]))


def test_loss_mask_covers_exactly_the_assistant_spans(tok):
  messages = TOOLS_CHAT + [{"role": "assistant", "content": "final answer"}]
  ids, mask = chat.encode_chat(tok, messages, [WEATHER, SEARCH])
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape
  text = chat.render(messages, [WEATHER, SEARCH]) + "<|im_end|>"
  assert ids.tolist() == tok.encode(text, allow_special=True)
  spans = [tok.decode(ids[a:b]) for a, b in _runs(mask)]
  assert spans == [TWO_CALLS_TEXT + "<|im_end|>", "final answer<|im_end|>"]
  assert tok.decode(ids[mask == 0]) == text.replace(spans[0], "").replace(spans[1], "")
  ids, mask = chat.encode_chat(tok, PRAHA, [WEATHER], add_generation_prompt=True)
  assert ids.tolist() == tok.encode(chat.render(PRAHA, [WEATHER], True), allow_special=True)
  assert [tok.decode(ids[a:b]) for a, b in _runs(mask)] == [
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
    '<|tool_call_argument_begin|>{"city": "Praha"}<|tool_call_end|><|tool_calls_section_end|>'
    "<|im_end|>", "V Praze je 12 °C a prší.<|im_end|>"]
  assert tok.decode(ids[-4:]).endswith("<|im_assistant|>assistant<|im_middle|>") and not mask[-1]
  with pytest.raises(ValueError, match="tokenizer 'byte' has no <|im_end|> token"):
    chat.encode_chat(data.ByteTokenizer(), messages)


def _reply(message):
  """What the model writes after the generation prompt to produce `message`."""
  user = [{"role": "user", "content": "q"}]
  return chat.render(user + [message])[len(chat.render(user, add_generation_prompt=True)):]


OFFICIAL = re.compile(r"<\|tool_call_begin\|>\s*(?P<tool_call_id>[\w\.]+:\d+)\s*"
                      r"<\|tool_call_argument_begin\|>\s*(?P<function_arguments>.*?)\s*"
                      r"<\|tool_call_end\|>", re.DOTALL)


@pytest.mark.parametrize("message", [
  TWO_CALLS, PRAHA[1],
  {"role": "assistant", "content": "Odpověď 中文 ", "tool_calls": [
    {"id": "functions.search:17", "function": {"name": "search", "arguments": {"q": "a\nb"}}}]}])
def test_parse_tool_calls_round_trips_render(message):
  text = _reply(message)
  assert text.endswith("<|tool_calls_section_end|>")
  parsed = chat.parse_tool_calls(text, [WEATHER, SEARCH])
  assert parsed.content == (message["content"] or "")
  want = [(c["id"], c["function"]["name"], c["function"]["arguments"])
          for c in message["tool_calls"]]
  got = [(c["id"], c["name"], c["arguments"]) for c in parsed.tool_calls]
  assert got == [(i, n, json.loads(a) if isinstance(a, str) else a) for i, n, a in want]
  assert all(c["error"] is None for c in parsed.tool_calls)
  assert _reply(parsed.message) == text  # ids and argument strings verbatim.
  official = [(m["tool_call_id"], m["tool_call_id"].split(".")[1].split(":")[0],
               json.loads(m["function_arguments"])) for m in OFFICIAL.finditer(text)]
  assert got == official
  assert chat.parse_tool_calls(text + "<|im_end|>").tool_calls == parsed.tool_calls


def test_parse_tool_calls_reports_malformed_calls_with_reasons():
  ok = '<|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>{"q": 1}<|tool_call_end|>'
  cases = [
    ('functions.search:1<|tool_call_argument_begin|>{"q": 2', "no <|tool_call_end|>"),
    ('functions.search:1<|tool_call_argument_begin|>{"q": 2,}<|tool_call_end|>',
     "arguments are not valid JSON"),
    ("functions.search:1<|tool_call_argument_begin|>[1, 2]<|tool_call_end|>",
     "arguments are a JSON list, not an object"),
    ('functions.launch:1<|tool_call_argument_begin|>{}<|tool_call_end|>',
     r"unknown function 'launch' \(declared: get_weather, search\)"),
    ('search:1<|tool_call_argument_begin|>{}<|tool_call_end|>',
     r"call id 'search:1' is not functions.\{name\}:\{index\}"),
    ('functions.search:1{"q": 2}<|tool_call_end|>', "no <|tool_call_argument_begin|>"),
  ]
  for bad, reason in cases:
    text = f"pre<|tool_calls_section_begin|>{ok}<|tool_call_begin|>{bad}<|tool_calls_section_end|>"
    parsed = chat.parse_tool_calls(text, [WEATHER, SEARCH])
    assert parsed.content == "pre" and len(parsed.tool_calls) == 2
    first, second = parsed.tool_calls
    assert first == {"id": "functions.search:0", "name": "search", "arguments": {"q": 1},
                     "error": None}
    assert second["arguments"] is None and re.match(reason, second["error"]), second["error"]
    assert len(parsed.message["tool_calls"]) == 2
  plain = chat.parse_tool_calls("Just text.<|im_end|>")
  assert plain == ("Just text.", [], {"role": "assistant", "content": "Just text."})
  cut = chat.parse_tool_calls(f"<|tool_calls_section_begin|>{ok}<|tool_call_begin|>functions.se")
  assert [c["error"] for c in cut.tool_calls] == [None, "no <|tool_call_argument_begin|> after the "
                                                  "call id"]


@pytest.mark.parametrize("messages, match", [
  ([{"content": "x"}], r"messages\[0\]: not a message dict with a string 'role'"),
  ([{"role": "user", "content": 3}], r"messages\[0\]: content must be a string, None or a list"),
  ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}],
   r"messages\[0\]: content must be"),
  ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}],
   r"messages\[1\]: a tool result needs 'tool_call_id'"),
  ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}],
   r"messages\[0\].tool_calls\[0\]: needs 'id' and 'function'"),
])
def test_bad_messages_raise_naming_the_message(messages, match):
  with pytest.raises(ValueError, match=match):
    chat.render(messages)
