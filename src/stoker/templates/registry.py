"""The built-in templates, under the names LLaMA-Factory configs already use (plus a few Stoker adds).

Rule: where ``shared/chat_templates`` holds a family's official template, the layout here renders it byte for
byte (``official=`` names the file; tests render both). Where Stoker differs on purpose, ``deviations`` says why,
per aspect. Families with no official template follow LLaMA-Factory's layout, or the family's documented format
where LLaMA-Factory's only approximates it (noted).
"""

from __future__ import annotations

from stoker.templates.families import (
    DbrxTemplate,
    DeepSeekTemplate,
    GlmTemplate,
    Llama4Template,
    LlamaTemplate,
    MistralTemplate,
    Qwen3Template,
)
from stoker.templates.formats import ChatTemplate, Layout, Official, Thinking

# Reasons shared by many families.
NO_TOOL_FORMAT = (
    "the official template has no tool format (it ignores tool definitions and mangles or rejects tool turns); "
    "Stoker writes LLaMA-Factory's default tool prompt into the system text and renders calls/results with it"
)
MISTRAL_SYSTEM_LAST = (
    "the official template adds the system prompt only when the conversation ends with a user message, so it "
    "vanishes from a finished conversation or one ending in tool results; Stoker, like mistral-common (Mistral's "
    "reference tokenizer), always puts it before the last user message"
)
MISTRAL_DEVIATIONS = {"closed+system": MISTRAL_SYSTEM_LAST, "system+tool_calls": MISTRAL_SYSTEM_LAST}
# mistral-common ships Jinja templates too; they disagree with its own tokenizer (whose goldens Stoker replays).
MISTRAL_COMMON_DEVIATIONS = {
    "whitespace": "Stoker trims replies as Mistral's Hugging Face template does; mistral-common's Jinja keeps the "
    "whitespace",
    "tool_calls": "mistral-common's Jinja writes a JSON tool result as a quoted string, while mistral-common's "
    "tokenizer (its token-id goldens, which Stoker matches) writes the JSON value itself",
}
NO_SYSTEM_ROLE = (
    "the model has no system role and the official template rejects one; Stoker folds the system prompt into the "
    "first user turn, as Gemma 3's official template and LLaMA-Factory do"
)



def no_tool_format(file: str, **deviations: str) -> Official:
    """An official template without a tool format (Stoker adds LLaMA-Factory's default one)."""
    return Official(file, deviations={"tools": NO_TOOL_FORMAT, "tool_calls": NO_TOOL_FORMAT, **deviations})


CHATML = Layout(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
    generation="<|im_start|>assistant\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n",
)
# Qwen passes tool results back inside one user turn.
QWEN = Layout(
    system=CHATML.system,
    user=CHATML.user,
    assistant=CHATML.assistant,
    generation=CHATML.generation,
    tool="\n<tool_response>\n{content}\n</tool_response>",
    tool_open="<|im_start|>user",
    tool_close="<|im_end|>\n",
)
# One image in a Qwen-VL prompt, before the processor expands <|image_pad|> to the image's tokens.
QWEN_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GEMMA = Layout(
    prefix="{bos}",
    system=None,
    user="<start_of_turn>user\n{content}<end_of_turn>\n",
    assistant="<start_of_turn>model\n{content}<end_of_turn>\n",
    generation="<start_of_turn>model\n",
    tool="<start_of_turn>tool\n{content}<end_of_turn>\n",
    strip=frozenset({"user", "assistant"}),
)
LLAVA = Layout(
    system="{content} ",
    user="USER: {content} ",
    assistant="ASSISTANT: {content} ",
    generation="ASSISTANT:",
    tool="TOOL: {content} ",
)
GLM = Layout(
    prefix="[gMASK]<sop>",
    system="<|system|>\n{content}",
    user="<|user|>\n{content}",
    assistant="<|assistant|>\n{content}",
    generation="<|assistant|>",
    tool="<|observation|>\n{content}",
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
INTERN_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language "
    "chosen by the user such as English and 中文."
)
DBRX_SYSTEM = (
    "You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions based on "
    "information available up to that point.\nYOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but "
    "provide thorough responses to more complex and open-ended questions.\nYou assist with various tasks, from "
    "writing to coding (using markdown for code blocks — remember to use ``` with code, JSON, and tables).\n(You do "
    "not have real-time data access or code execution capabilities. You avoid stereotyping and provide balanced "
    "perspectives on controversial topics. You do not provide song lyrics, poems, or news articles and do not "
    "divulge details of your training data.)\nThis is your system prompt, guiding your responses. Do not reference "
    "it, just respond to the user. If you find yourself talking about this message, stop. You should be responding "
    "appropriately and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT "
    "YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY."
)
DEEPSEEK_CODER_SYSTEM = (
    # The official template's wording (LLaMA-Factory's differs in capitalisation and ends with a period).
    "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, and you "
    "only answer questions related to computer science. For politically sensitive questions, security and privacy "
    "issues, and other non-computer science questions, you will refuse to answer\n"
)
MISTRAL_SMALL_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in "
    "Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is {today}.\n\nWhen you're not sure "
    "about some information, you say that you don't have the information and don't make up anything.\nIf the user's "
    "question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, "
    "you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \"What are "
    "some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => "
    "\"Where do you travel from?\")"
)
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
LLAMA3_BOS = "<|begin_of_text|>"


def _chatml(name: str, description: str, *, system: str | None = None, bos: str = "", **kw: object) -> ChatTemplate:
    return ChatTemplate(name, CHATML, description=description, default_system=system, stop_words=["<|im_end|>"],
                        bos=bos, eos="<|im_end|>", **kw)  # type: ignore[arg-type]


def _build() -> dict[str, ChatTemplate]:
    t: list[ChatTemplate] = [
        # --- generic --------------------------------------------------------------------------------------------------
        ChatTemplate(
            "default",
            Layout(
                system="System: {content}{eos}\n",
                user="Human: {content}{eos}\n",
                assistant="Assistant:{content}{eos}\n",
                generation="Assistant:",
            ),
            description="LLaMA-Factory's default (Human:/Assistant:)",
            stop_words=["\nHuman:"], bos="<s>", eos="</s>",
        ),
        # Plain completion: the text is encoded as the tokenizer encodes it on its own, so BOS stays where the
        # tokenizer puts it (a base model such as stories260K needs it to continue a story as it was trained).
        ChatTemplate("empty", Layout(), description="no formatting at all: turns are concatenated",
                     bos="<s>", eos="</s>", tokenizer_specials=True),
        ChatTemplate(
            "alpaca",
            Layout(
                user="### Instruction:\n{content}\n\n",
                assistant="### Response:\n{content}{eos}\n\n",
                generation="### Response:\n",
            ),
            description="Alpaca instruction format",
            default_system=(
                "Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n"
            ),
            stop_words=["### Instruction:"], bos="<s>", eos="</s>",
        ),
        ChatTemplate(
            # No official HF template exists (shared/vicuna.jinja is a community rewrite with extra line breaks).
            # This is FastChat's vicuna_v1.1 layout, with BOS as the Llama tokenizer adds it; LLaMA-Factory's
            # approximates it without the spaces after the system prompt and "ASSISTANT:".
            "vicuna",
            Layout(prefix="{bos}", system="{content} ", user="USER: {content} ", assistant="ASSISTANT: {content}{eos}",
                   generation="ASSISTANT:"),
            description="Vicuna v1.1 (FastChat) USER:/ASSISTANT:",
            default_system=VICUNA_SYSTEM, stop_words=["USER:"], bos="<s>", eos="</s>",
        ),
        # --- Llama ----------------------------------------------------------------------------------------------------
        ChatTemplate(
            "llama2",
            Layout(
                system=None,
                fold="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
                fold_then_strip=True,
                user="{bos}[INST] {content} [/INST]",
                assistant=" {content} {eos}",
                strip=frozenset({"user", "assistant"}),
            ),
            description="Llama 2 chat ([INST] ... [/INST], <<SYS>> in the first turn)",
            bos="<s>", eos="</s>",
            official=[
                no_tool_format("llama-2-chat.jinja"),
                no_tool_format("llama-2-chat.strip-variant.jinja"),
            ],
        ),
        LlamaTemplate(
            "llama3",
            Layout(),
            description="Llama 3 / 3.1 / 3.2 / 3.3 instruct (Llama 3.1's layout when tools are given)",
            header=("<|start_header_id|>", "<|end_header_id|>"), eot="<|eot_id|>", date="26 Jul 2024",
            dated_with_tools_only=True, trim=True,
            stop_words=["<|eot_id|>", "<|eom_id|>"], tool_format="llama3", bos=LLAMA3_BOS, eos="<|eot_id|>",
            official=[
                Official(
                    "llama-3-instruct.jinja",
                    deviations={
                        "tools": "Llama 3 had no tool format; with tools Stoker renders Llama 3.1's official layout "
                        "(proven against llama-3.1-instruct.jinja)",
                        "tool_calls": "Llama 3 had no tool turns; Stoker writes calls and ipython results as "
                        "Llama 3.1 does",
                    },
                ),
                Official(
                    "llama-3.1-instruct.jinja", aspects=frozenset({"tools"}),
                    deviations={"parallel_calls": "Llama 3.1's template refuses several calls in one turn; Stoker "
                                "writes them as one JSON list, as LLaMA-Factory does"},
                ),
            ],
        ),
        LlamaTemplate(
            "llama3_1",
            Layout(),
            description="Llama 3.1 instruct exactly as its template writes it (dated system turn, tools)",
            header=("<|start_header_id|>", "<|end_header_id|>"), eot="<|eot_id|>", date="26 Jul 2024", trim=True,
            stop_words=["<|eot_id|>", "<|eom_id|>"], tool_format="llama3", bos=LLAMA3_BOS, eos="<|eot_id|>",
            official=[
                Official("llama-3.1-instruct.jinja", deviations={
                    "parallel_calls": "Llama 3.1's template refuses several calls in one turn; Stoker writes them as "
                    "one JSON list, as LLaMA-Factory does"}),
            ],
        ),
        Llama4Template(
            "llama4",
            Layout(),
            description="Llama 4 instruct (<|header_start|> ... <|eot|>)",
            header=("<|header_start|>", "<|header_end|>"), eot="<|eot|>", trim=False,
            stop_words=["<|eot|>", "<|eom|>"], tool_format="llama4", bos=LLAMA3_BOS, eos="<|eot|>",
            image_token="<|image|>",
            official=[Official("llama-4.jinja")],
        ),
        # --- Mistral --------------------------------------------------------------------------------------------------
        MistralTemplate(
            # The original v0.1 template ("[/INST]" glued to the reply) tokenizes differently from Mistral's
            # reference tokenizer; Mistral's updated template, followed here, matches it (tests replay the goldens).
            "mistral_v1",
            Layout(),
            description="Mistral tokenizer v1: Mistral-7B-Instruct v0.1/v0.2, Mixtral-8x7B",
            version="v1", bos="<s>", eos="</s>",
            official=[
                no_tool_format("mistral-instruct-v1-updated.jinja"),
                no_tool_format("sources/mistral-common/v1_spm.jinja"),
            ],
        ),
        MistralTemplate(
            "mistral_v2",
            Layout(),
            description="Mistral tokenizer v2: Mixtral-8x22B ([TOOL_CALLS] without ids)",
            version="v2", bos="<s>", eos="</s>", tool_format="mistral",
            # v2 drops tool turns before the last user message, so results only show in a conversation ending in them.
            official=[Official("sources/mistral-common/v2_spm.jinja", arguments="text", deviations={
                "whitespace": MISTRAL_COMMON_DEVIATIONS["whitespace"],
                "tools+tool_calls": MISTRAL_COMMON_DEVIATIONS["tool_calls"]})],
        ),
        MistralTemplate(
            "mistral",
            Layout(),
            description="Mistral tokenizer v3: Mistral-7B-Instruct-v0.3 ([AVAILABLE_TOOLS], [TOOL_CALLS])",
            version="v3", bos="<s>", eos="</s>", tool_format="mistral",
            official=[
                Official("mistral-instruct-v0.3.jinja", deviations=MISTRAL_DEVIATIONS),
                Official("sources/mistral-common/v3_spm.jinja", arguments="text", deviations=MISTRAL_COMMON_DEVIATIONS),
            ],
        ),
        MistralTemplate(
            "ministral",
            Layout(),
            description="Mistral tokenizer v3 tekken: Mistral-Nemo, Ministral (no spaces after control tokens)",
            version="v3t", bos="<s>", eos="</s>", tool_format="mistral",
            official=[
                Official("mistral-nemo-tekken.jinja", deviations=MISTRAL_DEVIATIONS),
                Official("sources/mistral-common/v3.jinja", arguments="text",
                         deviations={"tool_calls": MISTRAL_COMMON_DEVIATIONS["tool_calls"]}),
            ],
        ),
        MistralTemplate(
            "mistral_small",
            Layout(),
            description="Mistral tokenizer v7 tekken: Mistral-Small-3 ([SYSTEM_PROMPT], dated default system)",
            version="v7t", bos="<s>", eos="</s>", tool_format="mistral", default_system=MISTRAL_SMALL_SYSTEM,
            image_token="[IMG]",
            official=[
                Official("mistral-small-3-v7-tekken.jinja", aspects=frozenset({"text"})),
                Official(
                    # Arguments as text: this template marks object arguments |safe, and Jinja then HTML-escapes
                    # the rest of the call.
                    "sources/mistral-common/v7.jinja", aspects=frozenset({"tools"}), arguments="text",
                    deviations={"no_system": "mistral-common's generic v7 template has no default system prompt; "
                                "Mistral Small 3's own template (compared above) has one and Stoker keeps it"},
                ),
            ],
        ),
        # --- ChatML and Qwen ------------------------------------------------------------------------------------------
        _chatml("chatml", "plain ChatML (<|im_start|>role ... <|im_end|>), no default system",
                official=[no_tool_format("chatml.jinja")]),
        ChatTemplate(
            "qwen", QWEN,
            description="Qwen2.5 (ChatML, Qwen's default system, Hermes <tool_call> tools)",
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            stop_words=["<|im_end|>"], tool_format="qwen", eos="<|im_end|>",
            official=[Official("qwen2.5-instruct.jinja")],
        ),
        ChatTemplate(
            "qwen2", QWEN,
            description="Qwen2 / Qwen1.5 chat (ChatML, default system 'You are a helpful assistant.')",
            default_system="You are a helpful assistant.", stop_words=["<|im_end|>"], tool_format="qwen",
            eos="<|im_end|>",
            official=[Official("qwen2-instruct.jinja", deviations={
                "tools": "Qwen2's template has no tool format; Stoker uses Qwen2.5's Hermes format",
                "tool_calls": "Qwen2's template has no tool format; Stoker uses Qwen2.5's Hermes format"})],
        ),
        ChatTemplate(
            "qwen2_vl", QWEN,
            description="Qwen2-VL / Qwen2.5-VL (ChatML with <|vision_start|><|image_pad|><|vision_end|>)",
            default_system="You are a helpful assistant.", stop_words=["<|im_end|>"], tool_format="qwen",
            eos="<|im_end|>", image_token=QWEN_VL_IMAGE,
            official=[Official("qwen2-vl.jinja", deviations={
                "tools": "the Qwen2-VL template has no tool format; Stoker uses Qwen2.5's Hermes format",
                "tool_calls": "the Qwen2-VL template has no tool format; Stoker uses Qwen2.5's Hermes format"})],
        ),
        Qwen3Template(
            "qwen3", QWEN,
            description="Qwen3 with reasoning (<think>; enable_thinking=False closes an empty block)",
            stop_words=["<|im_end|>"], tool_format="qwen3", thinking=Thinking(), eos="<|im_end|>",
            official=[Official("qwen3.jinja", deviations={
                "thinking_on": "this file is axolotl's variant, which also opens '<think>\\n\\n' in the generation "
                "prompt; Qwen3's own template, and Stoker, leave opening the block to the model"})],
        ),
        ChatTemplate(
            "qwen3_nothink", QWEN,
            description="Qwen3 instruct models without reasoning (e.g. Qwen3-*-Instruct-2507)",
            stop_words=["<|im_end|>"], tool_format="qwen3", eos="<|im_end|>",
        ),
        # Qwen3-VL: Qwen3's layouts with the Qwen-VL image text (LLaMA-Factory's qwen3_vl and qwen3_vl_nothink).
        Qwen3Template(
            "qwen3_vl", QWEN,
            description="Qwen3-VL Thinking models (Qwen3 with reasoning, <|vision_start|><|image_pad|><|vision_end|>)",
            stop_words=["<|im_end|>"], tool_format="qwen3", thinking=Thinking(), eos="<|im_end|>",
            image_token=QWEN_VL_IMAGE,
        ),
        ChatTemplate(
            "qwen3_vl_nothink", QWEN,
            description="Qwen3-VL Instruct models (ChatML, no default system, Qwen-VL image tokens)",
            stop_words=["<|im_end|>"], tool_format="qwen3", eos="<|im_end|>", image_token=QWEN_VL_IMAGE,
        ),
        _chatml("yi", "Yi / Yi-1.5 chat (plain ChatML)",
                official=[no_tool_format("yi-chat.jinja")]),
        _chatml("smollm", "SmolLM instruct (ChatML)"),
        _chatml("smollm2", "SmolLM2 instruct (ChatML, SmolLM default system)",
                system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        ChatTemplate(
            "intern2", Layout(prefix="{bos}", system=CHATML.system, user=CHATML.user, assistant=CHATML.assistant,
                              generation=CHATML.generation, tool=CHATML.tool),
            description="InternLM2 / 2.5 chat (BOS + ChatML, InternLM default system)",
            default_system=INTERN_SYSTEM, stop_words=["<|im_end|>"], bos="<s>", eos="</s>",
        ),
        DbrxTemplate(
            "dbrx", Layout(system=CHATML.system, user=CHATML.user, assistant=CHATML.assistant,
                           generation=CHATML.generation, tool=CHATML.tool, strip=frozenset({"system"})),
            description="DBRX instruct (ChatML, long default system)",
            default_system=DBRX_SYSTEM, stop_words=["<|im_end|>"], eos="<|endoftext|>",
            official=[no_tool_format("dbrx-instruct.jinja")],
        ),
        # --- Gemma ----------------------------------------------------------------------------------------------------
        ChatTemplate(
            "gemma", GEMMA, description="Gemma instruct (<start_of_turn>user/model)",
            stop_words=["<end_of_turn>"], bos="<bos>", eos="<eos>",
            official=[no_tool_format("gemma-it.jinja", system=NO_SYSTEM_ROLE)],
        ),
        ChatTemplate(
            "gemma2", GEMMA, description="Gemma 2 instruct",
            stop_words=["<end_of_turn>", "<eos>"], bos="<bos>", eos="<eos>",
            official=[no_tool_format("gemma-2-it.jinja", system=NO_SYSTEM_ROLE)],
        ),
        ChatTemplate(
            "gemma3", GEMMA, description="Gemma 3 (system folded into the first user turn; <start_of_image>)",
            stop_words=["<end_of_turn>"], bos="<bos>", eos="<eos>", image_token="<start_of_image>",
            official=[no_tool_format("gemma-3-it.jinja")],
        ),
        ChatTemplate(
            "gemma3n", GEMMA, description="Gemma 3n (as Gemma 3; <image_soft_token>)",
            stop_words=["<end_of_turn>"], bos="<bos>", eos="<eos>", image_token="<image_soft_token>",
            official=[no_tool_format("gemma-3n.jinja")],
        ),
        # --- Phi ------------------------------------------------------------------------------------------------------
        ChatTemplate(
            "phi",
            Layout(system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
                   assistant="<|assistant|>\n{content}<|end|>\n", generation="<|assistant|>\n",
                   skip_empty_system=True),
            description="Phi-3 / Phi-3.5 (<|user|> ... <|end|>)",
            stop_words=["<|end|>"], bos="<s>", eos="<|endoftext|>",
            official=[
                no_tool_format("phi-3.5.jinja"),
                no_tool_format("phi-3.jinja", system="Phi-3's first template silently drops system messages; Stoker "
                               "keeps them, as Phi-3.5's does"),
            ],
        ),
        ChatTemplate(
            # Official plain Phi-4 template is not in shared/ (phi-4-reasoning.jinja belongs to another model).
            "phi4",
            Layout(system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
                   user="<|im_start|>user<|im_sep|>{content}<|im_end|>",
                   assistant="<|im_start|>assistant<|im_sep|>{content}<|im_end|>",
                   generation="<|im_start|>assistant<|im_sep|>",
                   tool="<|im_start|>tool<|im_sep|>{content}<|im_end|>"),
            description="Phi-4 (<|im_start|>role<|im_sep|>)",
            stop_words=["<|im_end|>"], eos="<|im_end|>",
        ),
        # --- DeepSeek -------------------------------------------------------------------------------------------------
        ChatTemplate(
            # DeepSeek LLM chat (7B/67B): no official template in shared/.
            "deepseek",
            Layout(prefix="{bos}", system="{content}\n\n", user="User: {content}\n\n",
                   assistant="Assistant: {content}{eos}", generation="Assistant:"),
            description="DeepSeek LLM chat (User:/Assistant:)",
            stop_words=["User:"], bos=DEEPSEEK_BOS, eos=DEEPSEEK_EOS,
        ),
        ChatTemplate(
            "deepseek2",
            Layout(prefix="{bos}", system="{content}\n\n", user="<｜User｜>{content}",
                   assistant="<｜Assistant｜>{content}{eos}", generation="<｜Assistant｜>"),
            description="DeepSeek-V2 / V2.5 chat (<｜User｜>, system followed by a blank line)",
            bos=DEEPSEEK_BOS, eos=DEEPSEEK_EOS,
            official=[no_tool_format("deepseek-v2.jinja")],
        ),
        DeepSeekTemplate(
            "deepseek3", Layout(),
            description="DeepSeek-V3 (<｜User｜>/<｜Assistant｜>, native tool-call blocks)",
            tool_format="deepseek3", bos=DEEPSEEK_BOS, eos=DEEPSEEK_EOS,
            official=[Official("deepseek-v3.jinja", arguments="text", deviations={
                "tools": "DeepSeek-V3's template ignores tool definitions, which leaves the model blind to them; "
                "Stoker lists them in the system prompt"})],
        ),
        DeepSeekTemplate(
            "deepseekr1", Layout(),
            description="DeepSeek-R1 and its distills (reasoning in <think>, cut from history)",
            tool_format="deepseek3", thinking=Thinking(), bos=DEEPSEEK_BOS, eos=DEEPSEEK_EOS,
            official=[Official("deepseek-r1-distill-qwen.jinja", arguments="text", deviations={
                "tools": "R1's template ignores tool definitions; Stoker lists them in the system prompt",
                "tool_calls": "this revision of R1's template leaves a single call's block unclosed (no "
                "<｜tool▁calls▁end｜>); Stoker writes DeepSeek-V3's corrected tool layout",
                "thinking_off": "R1's template cannot switch reasoning off; Stoker closes an empty <think> block",
            })],
        ),
        ChatTemplate(
            "deepseekcoder",
            Layout(prefix="{bos}", user="### Instruction:\n{content}\n",
                   assistant="### Response:\n{content}\n<|EOT|>\n", generation="### Response:\n"),
            description="DeepSeek-Coder instruct (### Instruction / ### Response)",
            default_system=DEEPSEEK_CODER_SYSTEM, stop_words=["<|EOT|>", "### Instruction:"],
            bos=DEEPSEEK_BOS, eos="<|EOT|>",
            official=[no_tool_format("deepseek-coder-instruct.jinja")],
        ),
        # --- GLM ------------------------------------------------------------------------------------------------------
        GlmTemplate(
            "glm4", GLM, description="GLM-4 chat ([gMASK]<sop>, <|user|>/<|assistant|>, GLM tool calls)",
            stop_words=["<|user|>", "<|observation|>"], tool_format="glm4", eos="<|endoftext|>",
        ),
        GlmTemplate(
            "chatglm3",
            Layout(prefix="[gMASK]sop", system=GLM.system, user=GLM.user, assistant=GLM.assistant,
                   generation=GLM.generation, tool=GLM.tool),
            description="ChatGLM3 ([gMASK]sop, GLM tool calls)",
            stop_words=["<|user|>", "<|observation|>"], tool_format="glm4", eos="</s>",
        ),
        # --- others ---------------------------------------------------------------------------------------------------
        ChatTemplate(
            "baichuan2", Layout(user="<reserved_106>{content}", assistant="<reserved_107>{content}",
                                generation="<reserved_107>"),
            description="Baichuan2 chat (<reserved_106>/<reserved_107>)",
            stop_words=["<reserved_106>"], bos="<s>", eos="</s>",
        ),
        ChatTemplate(
            "zephyr",
            Layout(system="<|system|>\n{content}{eos}\n", user="<|user|>\n{content}{eos}\n",
                   assistant="<|assistant|>\n{content}{eos}\n", generation="<|assistant|>\n"),
            # LLaMA-Factory adds a default system ("You are Zephyr..."); the official template has none.
            description="Zephyr (<|user|> ... </s>)", bos="<s>", eos="</s>",
            official=[no_tool_format("zephyr.jinja")],
        ),
        ChatTemplate(
            "openchat",
            Layout(prefix="{bos}", system="GPT4 Correct System: {content}<|end_of_turn|>",
                   user="GPT4 Correct User: {content}<|end_of_turn|>",
                   assistant="GPT4 Correct Assistant: {content}<|end_of_turn|>",
                   generation="GPT4 Correct Assistant:", tool="GPT4 Correct Tool: {content}<|end_of_turn|>"),
            description="OpenChat 3.5 (GPT4 Correct User/Assistant)",
            stop_words=["<|end_of_turn|>"], bos="<s>", eos="</s>",
            official=[no_tool_format("openchat-3.5.jinja")],
        ),
        ChatTemplate(
            "cohere",
            Layout(prefix="{bos}", system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
                   user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
                   assistant="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
                   generation="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                   strip=frozenset({"user", "assistant"})),
            description="Cohere Command-R (<|START_OF_TURN_TOKEN|>)",
            stop_words=["<|END_OF_TURN_TOKEN|>"], bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>",
            official=[no_tool_format("command-r.jinja")],
        ),
        ChatTemplate(
            # The llava-hf processor template: no default system and no eos after replies (LLaMA-Factory's
            # vicuna-style copy adds both).
            "llava", LLAVA, description="LLaVA-1.5 (USER: <image>\\n... ASSISTANT:)",
            stop_words=["USER:"], bos="<s>", eos="</s>", image_token="<image>",
            official=[no_tool_format("llava-1.5.jinja")],
        ),
        ChatTemplate(
            # No official LLaVA-NeXT template in shared/; llava-hf's v1.6-vicuna processor uses LLaVA-1.5's layout.
            "llava_next", LLAVA, description="LLaVA-NeXT (vicuna variant; LLaVA-1.5 layout)",
            stop_words=["USER:"], bos="<s>", eos="</s>", image_token="<image>",
        ),
        ChatTemplate(
            "falcon",
            Layout(system="System: {content}\n", user="User: \n{content}\n", assistant="Falcon:\n{content}\n",
                   generation="Falcon:\n"),
            description="Falcon instruct (User:/Falcon:)",
            stop_words=["\nUser:"], eos="<|endoftext|>",
            official=[no_tool_format("falcon-instruct.jinja")],
        ),
        ChatTemplate(
            # shared/granite-instruct.jinja is Granite Code's Question:/Answer: layout, another family.
            "granite3",
            Layout(system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n",
                   user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n",
                   assistant="<|start_of_role|>assistant<|end_of_role|>{content}<|end_of_text|>\n",
                   generation="<|start_of_role|>assistant<|end_of_role|>",
                   tool="<|start_of_role|>tool_response<|end_of_role|>{content}<|end_of_text|>\n"),
            description="IBM Granite 3 (<|start_of_role|>)",
            stop_words=["<|end_of_text|>"], eos="<|end_of_text|>",
        ),
        ChatTemplate(
            "solar",
            Layout(system="### System:\n{content}\n\n", user="### User:\n{content}\n\n",
                   assistant="### Assistant:\n{content}", generation="### Assistant:\n", skip_empty_system=True),
            description="SOLAR instruct (### User: / ### Assistant:)",
            stop_words=["### User:"], bos="<s>", eos="</s>",
            official=[no_tool_format("solar-instruct.jinja")],
        ),
        ChatTemplate(
            # StarChat (not StarCoder2-Instruct, whose template is in shared/ under another name).
            "starchat",
            Layout(system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
                   assistant="<|assistant|>\n{content}<|end|>\n", generation="<|assistant|>"),
            description="StarChat (<|system|>/<|user|>/<|assistant|> ... <|end|>)",
            stop_words=["<|end|>"], eos="<|endoftext|>",
        ),
        ChatTemplate(
            "olmo",
            Layout(prefix="{eos}", user="<|user|>\n{content}", assistant="<|assistant|>\n{content}{eos}",
                   generation="<|assistant|>\n"),
            description="OLMo instruct (starts with EOS; <|user|>/<|assistant|>)",
            eos="<|endoftext|>",
        ),
    ]
    return {tpl.name: tpl for tpl in t}


TEMPLATES: dict[str, ChatTemplate] = _build()
