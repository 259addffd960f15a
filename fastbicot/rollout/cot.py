"""The semantic-CoT prompt (T2I-R1's reasoning template) and the re-templated image prompt."""

SYSTEM_PROMPT = (
    "You are a helpful assistant that receives an image prompt and generate a visualization of the prompt."
)

INSTRUCTION = (
    'You are asked to generate an image based on this prompt: "{prompt}"\n'
    "Provide a brief, precise visualization of all elements in the prompt. Your description should:\n"
    "1. Include every object mentioned in the prompt\n"
    "2. Specify visual attributes (color, number, shape, texture) if specified in the prompt\n"
    "3. Clarify spatial relationships if specified in the prompt\n"
    "4. Be concise (50 words or less)\n"
    "5. Focus only on what's explicitly stated in the prompt\n"
    "6. Do not elaborate beyond the attributes or relationships specified in the prompt\n"
    "Do not miss objects in the prompt."
)

COT_TEMPLATE = "{system}\n\nUser: {instruction}\n\nAssistant:"

# The seed's image context: the prompt and its CoT, re-templated, followed by <begin_of_image>.
IMAGE_TEMPLATE_HEAD = "User: {prompt}. "
IMAGE_TEMPLATE_TAIL = "\n\nAssistant:"


def cot_prompt(
    prompt: str, template: str = COT_TEMPLATE, system: str = SYSTEM_PROMPT, instruction: str = INSTRUCTION
) -> str:
    """The text the policy continues with its plan (BOS is added by the engine)."""
    return template.format(system=system, instruction=instruction.format(prompt=prompt))
