"""A chat run behind /v1/chat/completions, called with the official `openai` client and with httpx."""

from __future__ import annotations

import httpx
import pytest

from chat_helpers import build_tiny_llama, write_chat_recipe, write_conversations

TOKEN = "chat-secret"


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, start_server):
    import honed

    folder = tmp_path_factory.mktemp("chat-serve")
    model = build_tiny_llama(folder / "llama")
    train = write_conversations(folder / "train.jsonl", 40, seed=1)
    recipe = write_chat_recipe(folder, model, train, **{"train.epochs": 1})
    run_dir = honed.run(str(recipe), show_progress=False).run_dir
    with start_server(run_dir, folder / "server.log", token=TOKEN) as server:
        yield server


def test_openai_client_gets_a_completion(chat_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key=TOKEN, http_client=httpx.Client(trust_env=False))
    models = client.models.list()
    model_id = models.data[0].id
    reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "my order is late"}], max_tokens=8)
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.prompt_tokens > 3 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key="wrong", http_client=httpx.Client(trust_env=False)).models.list()


def test_chat_requests_are_validated(chat_server):
    with chat_server.client() as client:
        ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["object"] == "chat.completion"
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}).status_code == 422
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}).status_code == 422
        assert client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 4}).status_code == 422
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "tools": []}).status_code == 422
        too_long = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "late order " * 2000}], "max_tokens": 4})
        assert too_long.status_code in (400, 413, 422)
        assert "Traceback" not in too_long.text and "/" not in too_long.json()["error"]["message"].split(":")[0]
