"""Characters: stored as files per login, imported from what people have (text-generation-webui's
YAML, character cards as JSON and PNG), every file treated as untrusted input; and offered by
extensions through a hook."""

import base64
import io
import json
import zlib

import pytest

from loadstar.engine.chat.characters import Character, CharacterStore, read_character
from loadstar.engine.errors import BadRequestError


def png(card: dict | None = None, *, size=(64, 48), chunk="tEXt", key="chara") -> bytes:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if card is not None:
        text = base64.b64encode(json.dumps(card).encode()).decode()
        if chunk == "tEXt":
            info.add_text(key, text)
        elif chunk == "zTXt":
            info.add_text(key, text, zip=True)
        else:
            info.add_itxt(key, text, zip=True)
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "PNG", pnginfo=info)
    return out.getvalue()


V2 = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
    "name": "Seraphina", "description": "{{char}} is a forest guardian.", "personality": "kind",
    "scenario": "{{user}} wakes in a glade.", "first_mes": "*{{char}} smiles* Welcome, {{user}}.",
    "mes_example": "<START>\n{{user}}: Who are you?\n{{char}}: A friend.", "system_prompt": ""}}


def test_text_generation_webui_yaml_and_cards_as_json_are_read():
    yaml_character = read_character(b"name: Ada\ngreeting: Hello {{user}}!\ncontext: |\n  {{char}} is a mathematician.\n",
                                    "Ada.yaml")
    assert (yaml_character.name, yaml_character.opening("Sam")) == ("Ada", "Hello Sam!")
    assert yaml_character.system_message() == "Ada is a mathematician."
    v1 = read_character(json.dumps({"name": "Bob", "description": "A baker.", "first_mes": "Bread?",
                                    "mes_example": "", "personality": "", "scenario": ""}).encode())
    assert (v1.name, v1.greeting, v1.context) == ("Bob", "Bread?", "A baker.")
    v2 = read_character(json.dumps(V2).encode(), "seraphina.json")
    assert v2.opening() == "*Seraphina smiles* Welcome, You."
    system = v2.system_message("Sam")
    assert system.startswith("Seraphina is a forest guardian.\n\nPersonality: kind\n\nScenario: Sam wakes in a glade.")
    assert system.endswith("Example dialogue:\nSam: Who are you?\nSeraphina: A friend.")  # <START> dropped
    old = read_character(b"char_name: Old\nchar_persona: An old-style card.\nchar_greeting: Hi\n")
    assert (old.name, old.context, old.greeting) == ("Old", "An old-style card.", "Hi")


@pytest.mark.parametrize("chunk", ["tEXt", "zTXt", "iTXt"])
def test_a_png_card_gives_its_character_and_its_picture(chunk):
    character = read_character(png(V2, size=(400, 300), chunk=chunk), "card.png")
    assert character.name == "Seraphina" and character.source == "card card.png"
    from PIL import Image

    picture = Image.open(io.BytesIO(base64.b64decode(character.picture)))
    assert picture.format == "PNG" and max(picture.size) == 128  # a thumbnail, not the 400 px image


def test_ccv3_wins_over_chara_in_one_png():
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps({"name": "Old"}).encode()).decode())
    info.add_text("ccv3", base64.b64encode(json.dumps({"spec": "chara_card_v3", "data": {"name": "New"}}).encode()).decode())
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG", pnginfo=info)
    assert read_character(out.getvalue()).name == "New"


@pytest.mark.parametrize(("data", "says"), [
    (b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR", "cut short"),
    (png(None), "no character card"),
    (png({"spec": "chara_card_v2", "data": {"description": "no name"}}), "no name"),
    (b"\xff\xfe\x00binary", "neither a PNG card nor text"),
    (b"{not json", "not valid JSON"),
    (b"- a\n- list\n", "expected YAML keys"),
    (b'{"name": ' + b"[" * 50_000 + b"1" + b"]" * 50_000 + b"}", "nested too deeply"),  # was a RecursionError
    (b"[" * 100_000, "nested too deeply"),  # YAML: PyYAML composes recursively
    (b"name: [unclosed", "not valid YAML"),
    (json.dumps({"name": "x" * 5000}).encode(), None),  # a name cut to 100 characters, not refused
])
def test_bad_character_files_get_one_line(data, says):
    if says is None:
        assert len(read_character(data).name) == 100
        return
    with pytest.raises(BadRequestError) as error:
        read_character(data)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_a_card_compressed_past_its_limit_is_refused_not_inflated():
    from PIL import Image

    huge = base64.b64encode(b"{" + b" " * (5 * 1024 * 1024) + b"}")
    raw = io.BytesIO()
    Image.new("RGB", (4, 4)).save(raw, "PNG")
    data = raw.getvalue()
    payload = b"chara\x00\x00" + zlib.compress(huge, 9)
    import struct

    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload + struct.pack(">I", zlib.crc32(b"zTXt" + payload))
    at = data.index(b"IEND") - 4
    with pytest.raises(BadRequestError, match="too large"):
        read_character(data[:at] + chunk + data[at:])


def test_a_picture_that_is_not_a_png_cannot_reach_the_page():
    with pytest.raises(ValueError, match="not a base64 PNG"):
        Character(name="x", picture="AAAA</style><script>alert(1)</script>")
    with pytest.raises(ValueError, match="not a base64 PNG"):
        Character(name="x", picture=base64.b64encode(b"GIF89a....").decode())
    export = json.dumps({"format": "loadstar-character/1", "name": "Evil", "picture": "x</style>"}).encode()
    with pytest.raises(BadRequestError, match="not valid"):
        read_character(export)


def test_the_store_keeps_each_logins_characters_apart_and_never_overwrites_on_import(tmp_path):
    store = CharacterStore(tmp_path / "characters")
    first = store.save("ann", Character(name="Ada Lovelace", greeting="Hi"))
    second = store.save("ann", Character(name="Ada Lovelace", greeting="Hello"))
    assert (first.id, second.id) == ("ada-lovelace", "ada-lovelace-2")
    assert [c.id for c in store.all("ann")] == ["ada-lovelace", "ada-lovelace-2"] and store.all("bob") == []
    changed = store.save("ann", first.model_copy(update={"greeting": "Good day"}), replace=first.id)
    assert changed.id == first.id and store.get("ann", first.id).greeting == "Good day"
    assert store.find("ann", "ADA LOVELACE").id in ("ada-lovelace", "ada-lovelace-2")
    with pytest.raises(BadRequestError, match="no character named"):
        store.find("bob", "Ada Lovelace")
    assert store.get("ann", "../../etc/passwd") is None
    exported = store.export("ann", first.id)
    imported = CharacterStore(tmp_path / "other").save(None, read_character(exported))
    assert (imported.name, imported.greeting) == ("Ada Lovelace", "Good day")
    store.delete("ann", first.id)
    assert [c.id for c in store.all("ann")] == ["ada-lovelace-2"]
    (store.folder("ann") / "broken.json").write_text("{")  # one bad file does not break the list
    assert [c.id for c in store.all("ann")] == ["ada-lovelace-2"]


def test_saves_of_one_name_at_once_keep_every_character(tmp_path):
    """Eight imports of one card at once (eight users' tabs, one login): eight characters, none lost."""
    from concurrent.futures import ThreadPoolExecutor

    store = CharacterStore(tmp_path / "characters")
    with ThreadPoolExecutor(8) as pool:
        saved = list(pool.map(lambda i: store.save("ann", Character(name="Ada", greeting=f"Hi {i}")), range(8)))
    assert len({c.id for c in saved}) == 8
    assert sorted(c.greeting for c in store.all("ann")) == sorted(f"Hi {i}" for i in range(8))


def test_extensions_offer_characters_through_the_hook(tmp_path):
    from loadstar import hookimpl
    from loadstar.engine.facade import Engine
    from loadstar.engine.plugins.host import PluginHost
    from loadstar.engine.settings import Settings

    class Plugin:
        @hookimpl
        def register_characters(self, register):
            register(Character(name="Guide", greeting="Welcome!", context="{{char}} shows people around."))

    engine = Engine(Settings(models_dir=tmp_path, data_dir=tmp_path / "data"), plugins=PluginHost([]))
    try:
        assert engine.plugins.register(Plugin(), name="guides")
        found = engine.characters.find(None, "guide")
        assert found.id == "guides:guide" and found.source == "extension guides"
        assert engine.plugins.register(Plugin(), name="../up")  # a plugin's name is no path in the id
        assert {c.id for c in engine.characters.all(None)} == {"guides:guide", "up:guide"}
        assert engine.characters.get(None, "guides:guide").opening() == "Welcome!"
        with pytest.raises(BadRequestError, match="cannot be changed"):
            engine.characters.save(None, found, replace=found.id)
    finally:
        engine.close()


def test_a_conversation_exported_with_its_character_brings_it_to_another_login(tmp_path):
    from loadstar.engine.chat.conversations import Conversation
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.facade import Engine
    from loadstar.engine.plugins.host import PluginHost
    from loadstar.engine.settings import Settings

    engine = Engine(Settings(models_dir=tmp_path, data_dir=tmp_path / "data"), plugins=PluginHost([]))
    try:
        vex = engine.characters.save("ann", read_character(png(V2), "card.png"))
        talk = engine.conversations.save("ann", Conversation(character=vex.id, messages=[
            ChatMessage(role="assistant", content="Welcome."), ChatMessage(role="user", content="Hi")]))
        exported = engine.export_conversation("ann", talk)
        assert json.loads(exported.read_text())["character_card"]["name"] == "Seraphina"
        imported = engine.import_conversation("bob", exported)
        brought = engine.characters.get("bob", imported.character)
        assert brought is not None and brought.context == vex.context and brought.picture == vex.picture
        again = engine.import_conversation("bob", exported)  # the same character is not saved twice
        assert again.character == imported.character and len(engine.characters.all("bob")) == 1
        plain = tmp_path / "plain.json"
        plain.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}], "character": "../../x"}))
        assert engine.import_conversation("bob", plain).character is None  # an id from a file is never trusted
        deep = tmp_path / "deep.json"
        deep.write_text("[" * 100_000)
        with pytest.raises(BadRequestError, match="nested too deeply"):  # one line, not a RecursionError
            engine.import_conversation("bob", deep)
    finally:
        engine.close()


def test_a_save_the_disk_refuses_says_why_in_one_line_and_leaves_nothing(tmp_path):
    from loadstar.engine.errors import LoadstarError

    store = CharacterStore(tmp_path / "characters")
    kept = store.save("ann", Character(name="Kept", context="first"))
    folder = store.folder("ann")
    (folder / "blocked.json").mkdir()  # what the OS refuses to replace: a folder where the file goes
    with pytest.raises(LoadstarError) as refused:
        store.save("ann", Character(name="Blocked", context="x"), replace="blocked")
    assert "could not be saved" in str(refused.value) and "\n" not in str(refused.value)
    # a new character the disk takes no more bytes for (a file size limit: writes fail with EFBIG):
    # the id it claimed is not left behind as an empty file
    import resource
    import signal

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, limits[1]))
    try:
        with pytest.raises(LoadstarError, match="could not be saved"):
            store.save("ann", Character(name="Too Big", context="x" * 100))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in folder.iterdir()) == ["blocked.json", f"{kept.id}.json"]
    assert store.get("ann", kept.id).context == "first"
