"""The one form every dataset is converted to before templating.

A canonical row is a plain dict (so that `datasets` can store it):
  prompt:   the conversation so far, a list of {"role", "content"} messages alternating a prompt role
            (user | observation) and a reply role (assistant | function), starting and ending with a prompt role;
  response: the candidate replies to it, each a {"role", "content"} message with a reply role:
            one for pt/sft/kto, two for ranking data (chosen, rejected), zero or one for prediction;
  system:   the system prompt ("" for none);
  tools:    a JSON list of tool definitions ("" for none);
  kto_tag:  True/False for kto data (desirable or not), None elsewhere;
  images:   the row's images in the order of the "<image>" placeholders in its messages, each {"bytes", "path"}
            as `datasets` stores an image (bytes of an encoded image, or a path relative to media_dir); [] for none;
  videos, audios: the same for its videos ("<video>") and audio clips ("<audio>").
A `function` message's content is a JSON tool call {"name", "arguments"} or a JSON list of them; an
`observation` is the tools' result(s), as text.
"""

USER, ASSISTANT, SYSTEM, FUNCTION, OBSERVATION = "user", "assistant", "system", "function", "observation"
PROMPT_ROLES = (USER, OBSERVATION)
REPLY_ROLES = (ASSISTANT, FUNCTION)


IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a message's text (LLaMA-Factory's placeholder)
# each media column -> where one of its items goes in a message's text (LLaMA-Factory's placeholders)
PLACEHOLDERS = {"images": IMAGE_PLACEHOLDER, "videos": "<video>", "audios": "<audio>"}


def canonical_row(prompt, response, system: str = "", tools: str = "", kto_tag: bool | None = None,
                  images=(), videos=(), audios=()) -> dict:
    return {"prompt": prompt, "response": response, "system": system or "", "tools": tools or "", "kto_tag": kto_tag,
            "images": list(images), "videos": list(videos), "audios": list(audios)}
