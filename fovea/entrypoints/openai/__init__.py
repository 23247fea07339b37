"""The OpenAI-compatible server: `fovea serve`.

    app.py           the app: routes, API key, /health, /metrics, /v1/models; run_server
    chat.py          /v1/chat/completions (prompts by chat_utils.build_chat_prompt, as LLM.chat)
    completions.py   /v1/completions
    streaming.py     server-sent events and the bookkeeping both endpoints share
    errors.py        OpenAI's error body for every refusal
    protocol.py      the request and response models
    metrics.py       Prometheus metrics
"""
