"""The semantic-CoT prompt and the image-step prompt, rendered exactly as the T2I-R1 seed renders them.

Seed references (CaraJ7/T2I-R1 @ 2d9d4d1):

* ``data/prompt/reasoning_prompt.txt``: the instruction (``INSTRUCTION``, with ``{prompt}`` where the
  seed file has ``{}``; the file's last line ends with one space, which the seed's ``.strip()`` drops).
* ``src/t2i-r1/src/open_r1/grpo.py:111-113, 136-141``: ``cot_prompt.format(example["prompt"])`` is the
  User turn.
* ``src/t2i-r1/src/janus/models/processing_vlm.py:174-175``: every message's content is ``.strip()``-ed,
  the conversation rendered, and the whole text ``.strip()``-ed again.
* ``src/t2i-r1/src/janus/utils/conversation.py:80-91`` (DeepSeek separator style, sep "\\n\\n"); the
  role names come from the messages themselves ("User"/"Assistant", ``conversation.py:157-159``), not
  from the template: ``system + "\\n\\n"`` (omitted when the system prompt is empty),
  ``"User: " + content + "\\n\\n"``, then ``"Assistant:"`` for the empty assistant turn; an empty User
  content renders as ``"User:"``.
* ``src/t2i-r1/src/open_r1/trainer/grpo_trainer.py:541-558``: the image step's text is the raw prompt,
  ``". "`` and the CoT decoded with ``skip_special_tokens=True``, rendered with an empty system prompt.

BOS is not part of these strings; the tokenizer adds it (``add_special_tokens=True`` in the seed).
"""

SYSTEM_PROMPT = (
    "You are a helpful assistant that receives an image prompt and generate a visualization of the prompt."
)

# data/prompt/reasoning_prompt.txt byte for byte, "{}" -> "{prompt}" (626 bytes in the seed file).
INSTRUCTION = (
    'You are asked to generate an image based on this prompt: "{prompt}"\n'
    "Provide a brief, precise visualization of all elements in the prompt. Your description should:\n"
    "1. Include every object mentioned in the prompt\n"
    "2. Specify visual attributes (color, number, shape, texture) if specified in the prompt\n"
    "3. Clarify relationships (e.g., spatial) between objects if specified in the prompt\n"
    "4. Be concise (50 words or less)\n"
    "5. Focus only on what's explicitly stated in the prompt\n"
    "6. Do not elaborate beyond the attributes or relationships specified in the prompt\n"
    "Do not miss objects. Output your visualization directly without explanation: "
)

# The seed's conversation with a non-empty system prompt and non-empty User content. cot_prompt renders
# the default template with the seed's own rules (empty system / empty content handled as the seed does).
COT_TEMPLATE = "{system}\n\nUser: {instruction}\n\nAssistant:"

# The image step's text is IMAGE_TEMPLATE_HEAD + CoT + IMAGE_TEMPLATE_TAIL before the seed's strips;
# image_prompt() applies them. The engine's "splice" option encodes the two pieces around raw CoT ids.
IMAGE_TEMPLATE_HEAD = "User: {prompt}. "
IMAGE_TEMPLATE_TAIL = "\n\nAssistant:"


def render_conversation(system: str, user: str) -> str:
    """The seed's ``apply_sft_template_for_multi_turn_prompts`` for one User turn and an empty Assistant
    turn: contents stripped, DeepSeek separator style with roles "User"/"Assistant", result stripped."""
    content = user.strip()
    text = "" if system == "" else system + "\n\n"
    text += f"User: {content}\n\n" if content else "User:"
    text += "Assistant:"
    return text.strip()


def cot_prompt(
    prompt: str, template: str = COT_TEMPLATE, system: str = SYSTEM_PROMPT, instruction: str = INSTRUCTION
) -> str:
    """The text the policy continues with its plan, WITHOUT BOS (the tokenizer / engine adds it).

    With the default ``template`` this is the seed's rendering exactly; a custom ``template`` is
    formatted with ``system=`` and ``instruction=`` (the instruction already holding the prompt).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    text = instruction.format(prompt=prompt)
    if template == COT_TEMPLATE:
        return render_conversation(system, text)
    return template.format(system=system, instruction=text)


def image_prompt(prompt: str, cot: str) -> str:
    """The seed's image-step text, before tokenization (BOS and <begin_of_image> are added around it).

    ``cot`` is the plan already decoded with special tokens skipped. Equals
    ``render_conversation("", f"{prompt}. {cot}")``: ``"User: {prompt}. {cot}\\n\\nAssistant:"`` with the
    content stripped (so an empty or whitespace-ending CoT leaves ``"{prompt}."``).
    """
    if not isinstance(prompt, str) or not isinstance(cot, str):
        raise TypeError(f"prompt and cot must be str, got {type(prompt).__name__} and {type(cot).__name__}")
    return render_conversation("", f"{prompt}. {cot}")
