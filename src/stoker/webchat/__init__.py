"""``stoker webchat``: the chat page in the browser (Gradio).

- ``session``: one browser session's conversation (turns) and the streaming reply, through the chat service.
- ``render``: turns into the Chatbot's messages; Markdown to HTML with raw HTML escaped.
- ``ui``: the Gradio Blocks page.
- ``app``: ``run_webchat(settings)``, the command.

Only ``app`` and ``ui`` import Gradio.
"""
