"""Saved conversations: atomic saves that survive SIGKILL, search, rename, export and import."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from loadstar.engine.chat.conversations import Conversation, ConversationStore
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import BadRequestError
from tests.conftest import ROOT


def chat(*texts):
    roles = ["user", "assistant"]
    return [ChatMessage(role=roles[i % 2], content=t) for i, t in enumerate(texts)]


def test_save_load_rename_delete(tmp_path):
    store = ConversationStore(tmp_path)
    saved = store.save(None, Conversation(title="Cats", messages=chat("hi", "hello")))
    assert store.load(None, saved.id).messages == saved.messages
    assert store.rename(None, saved.id, "  Dogs  and cats ").title == "Dogs and cats"
    assert [c.title for c in store.summaries(None)] == ["Dogs and cats"]
    assert store.summaries("alice") == []  # another login sees none of it
    store.delete(None, saved.id)
    assert store.summaries(None) == []
    with pytest.raises(BadRequestError, match="not a conversation id"):
        store.load(None, "../../settings")


def test_search_finds_every_word_across_conversations(tmp_path):
    store = ConversationStore(tmp_path)
    store.save(None, Conversation(title="Trip", messages=chat("Plan a trip to Lisbon", "Take the tram")))
    store.save(None, Conversation(title="Food", messages=chat("Best pastel de nata in Lisbon?", "Belém")))
    assert {h.title for h in store.search(None, "lisbon")} == {"Trip", "Food"}
    [hit] = store.search(None, "TRAM lisbon")
    assert hit.title == "Trip" and "tram" in hit.snippet.lower()
    assert store.search(None, "nowhere") == [] and store.search(None, "  ") == []


def test_export_then_import_makes_a_new_copy(tmp_path):
    store = ConversationStore(tmp_path)
    original = store.save(None, Conversation(title="Keep", system="Be brief.", messages=chat("a", "b")))
    copy = store.import_(None, store.export(None, original.id))
    assert copy.id != original.id and (copy.title, copy.system, copy.messages) == ("Keep", "Be brief.", original.messages)
    bare = store.import_(None, json.dumps([{"role": "user", "content": "just a list"}]).encode())
    assert bare.title == "just a list"
    for bad, message in [(b"\xff", "not JSON"), (b'{"x": 1}', "holds no conversation"),
                         (b'{"messages": [{"role": "wizard", "content": "x"}]}', "not valid: messages.0.role")]:
        with pytest.raises(BadRequestError, match=message):
            store.import_(None, bad)
    assert len(store.summaries(None)) == 3
    huge = tmp_path / "huge.json"
    with huge.open("wb") as handle:
        handle.truncate(21 * 1024 * 1024)  # sparse: refused by size, never read
    with pytest.raises(BadRequestError, match="larger than 20 MiB"):
        store.import_file(None, huge)
    with pytest.raises(BadRequestError, match="cannot read the file"):
        store.import_file(None, tmp_path / "missing.json")


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.chat.conversations import Conversation, ConversationStore
    store = ConversationStore(Path(sys.argv[2]))
    conversation = Conversation(id="00000000000000aa", messages=[])
    turn = 0
    while True:
        turn += 1
        text = f"turn {turn} " + "x" * 200_000  # big enough that a write takes a while
        conversation = conversation.model_copy(update={"messages": [*conversation.messages[-20:], ChatMessage(role="user", content=text)]})
        store.save(None, conversation)
        print(turn, flush=True)
""")


def test_a_save_killed_mid_write_leaves_the_previous_history_whole(tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    for attempt in range(5):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), str(store.root)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(3 + attempt):
                writer.stdout.readline()  # several saves are done and the next is in flight
            time.sleep(0.003 * attempt)
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
            writer.stdout.close()
        loaded = store.load(None, "00000000000000aa")  # parses: never half-written
        turns = [int(m.content.split()[1]) for m in loaded.messages]
        assert turns == list(range(turns[0], turns[0] + len(turns))) and len(turns) >= 3
    leftovers = [p.name for p in store.folder(None).iterdir() if p.suffix == ".tmp"]
    assert all(name.startswith(".") for name in leftovers)  # a killed write leaves only a hidden temp file
    assert [c.id for c in store.summaries(None)] == ["00000000000000aa"]


def test_conversation_folders_are_the_logins_own_and_killed_saves_are_swept_on_the_next(tmp_path):
    import stat

    from loadstar.engine.atomic import write_atomic

    store = ConversationStore(tmp_path / "conversations")
    saved = store.save("alice", Conversation(messages=chat("hi", "hello")))
    for folder in (store.root, store.folder("alice")):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder  # other accounts on the machine read nothing
    assert stat.S_IMODE(store._path("alice", saved.id).stat().st_mode) == 0o600
    # A killed save of any store leaves a hidden temp file; the next save of that file removes it once
    # it is a minute old (a save running beside it is younger), and leaves other files' temps alone.
    settings = tmp_path / "settings.json"
    stale, fresh, other = (tmp_path / ".settings.json.x1.tmp", tmp_path / ".settings.json.x2.tmp",
                           tmp_path / ".presets.json.x3.tmp")
    for temp in (stale, fresh, other):
        temp.write_text("{half")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    os.utime(other, (time.time() - 120, time.time() - 120))
    write_atomic(settings, b"{}")
    assert not stale.exists() and fresh.exists() and other.exists()
