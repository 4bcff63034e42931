"""Instruction parser: OFASys presets, canonical round trip, every error kind, fuzzing."""

from __future__ import annotations

import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_gen.tasks.instruction import (
    BUILTIN_SLOT_ATTRIBUTES,
    AttrSpec,
    Instruction,
    InstructionError,
    Slot,
    Template,
)

# REFERENCE.md §1: the OFASys preset instructions, verbatim.
PRESETS = [
    "[IMAGE:img] what does the image describe? -> [TEXT:cap]",
    '[IMAGE:img] which region does the text " [TEXT:cap] " describe? -> [BOX:patch_boxes]',
    'is the sentiment of text " [TEXT:sentence] " positive or negative? -> is the sentiment of text '
    '" [TEXT:sentence,no_loss] " positive or negative? [TEXT:label,closed_set]',
    'what is the complete text of " [TEXT:text,mask_ratio=0.3] "? -> [TEXT:text]',
    "[AUDIO:wav] what is the text corresponding to the voice? -> [TEXT:text,preprocess=text_phone]",
    "[PHONE:text] -> [AUDIO:fbank,adaptor=audio_tgt_fbank]",
    "[IMAGE:image,adaptor=image_vit] what does the image describe? -> [TEXT:caption]",
]
# More instructions from the OFASys docs and task configs.
OFASYS_DOCS = [
    "[IMAGE:image,preprocess=imagenet] what does the image describe? -> [TEXT:label_name,closed_set]",
    "[IMAGE:img] what does the region describe? region: [BOX:region_coord] -> [TEXT:cap]",
    "[VIDEO:video] [TEXT:question] -> [TEXT:answer,is_label]",
    '" [TEXT:src] " ; structured knowledge: " [STRUCT:database,max_length=876] " . generating sql code. '
    "-> [TEXT:tgt]",
    'structured knowledge: " [STRUCT:database,uncased] "  . how to describe the tripleset ? -> [TEXT:tgt]',
    'what is the complete image? caption: [TEXT:text]"? '
    "-> [IMAGE,preprocess=image_vqgan,adaptor=image_vqgan]",
    'what is the summary of article " [TEXT:src] "? -> [TEXT:tgt,noise_ratio=0.2] ',
    "motion capture: [TEXT:text] -> [MOTION:bvh_frames,preprocess=motion_6d,adaptor=motion_6d]",
    "[TEXT:instruction] [TEXT:examples] [TEXT:src] -> [TEXT:tgt,max_length=128]",
    "[IMAGE:img] what are the objects in the image? -> ( [BOX] [TEXT])*",
    "What does the image [IMAGE] describe? -> [TEXT]",
]
# A user-registered modality with a free-text attribute, for quoted values.
CUSTOM = {
    **BUILTIN_SLOT_ATTRIBUTES,
    "NOTE": {"prompt": AttrSpec("str"), "weight": AttrSpec("float", 0.0, 10.0)},
}
EXTENSIONS = [
    "[IMAGE:img] what are the objects? -> ( [BOX:boxes] [TEXT:labels] )*",
    "[IMAGE:img] ( [BOX:b] is [TEXT:t] , )* and ( [BOX:c] )* -> ( [TEXT:u] )*",
    "[TEXT:x] ->",
    "-> [TEXT:y]",
    "->",
    "[IMAGE:img] caption: -> [TEXT:cap] ||| [IMAGE:img] describe it -> [TEXT:cap]|||-> [TEXT:cap]",
    "[IMAGE:img] -> [TEXT:cap] [BOX:box] [TEXT:label,closed_set]",
    "what (if any) is shown? [IMAGE:img] -> [TEXT:answer]",
    "[IMAGE:img] ( [TEXT:q] (optional) ) )* -> [TEXT:a]",
    "[MOTION:m,min_length=10,max_length=200,sample_rate=2,soft_trim=0.5,window,anchor_frame=0] -> [TEXT:t]",
    '[NOTE:n,prompt="a, b ] = c -> d \\" e \\\\ |||"] -> [NOTE,prompt="",weight=1e-3]',
    "[ TEXT : col , no_loss , max_length = 7 ] -> [TEXT,adapter=x]",
]


def fault(text: str, **kwargs) -> InstructionError:
    with pytest.raises(InstructionError) as info:
        Instruction.parse(text, **kwargs)
    return info.value


def lit(text: str, repeat: int | None = None) -> Slot:
    return Slot.literal(text, repeat)


@pytest.mark.parametrize("text", PRESETS + OFASYS_DOCS + EXTENSIONS)
def test_parses_and_round_trips(text):
    ist = Instruction.parse(text, modalities=CUSTOM)
    assert Instruction.parse(str(ist), modalities=CUSTOM) == ist
    assert str(Instruction.parse(str(ist), modalities=CUSTOM)) == str(ist)  # canonical is a fixed point
    assert pickle.loads(pickle.dumps(ist)) == ist
    assert hash(ist) == hash(Instruction.parse(text, modalities=CUSTOM))


def test_caption_and_grounding_presets():
    cap = Instruction.parse(PRESETS[0])
    assert cap.encoder_slots == (Slot("IMAGE", "img"), lit("what does the image describe?"))
    assert cap.decoder_slots == (Slot("TEXT", "cap"),)
    assert cap.templates[0].columns == {"img", "cap"}
    grounding = Instruction.parse(PRESETS[1]).templates[0]
    assert [s.modality for s in grounding.encoder] == ["IMAGE", "TEXT", "TEXT", "TEXT"]
    # quote characters are literal text; whitespace around each piece is stripped (as in OFASys)
    literals = [s.text for s in grounding.encoder if s.is_literal]
    assert literals == ['which region does the text "', '" describe?']
    assert grounding.decoder == (Slot("BOX", "patch_boxes"),)


def test_sentiment_preset_copies_the_prompt_into_the_decoder():
    t = Instruction.parse(PRESETS[2]).templates[0]
    prompt = [lit('is the sentiment of text "'), Slot("TEXT", "sentence"), lit('" positive or negative?')]
    assert list(t.encoder) == prompt
    assert t.decoder[:3] == (prompt[0], Slot("TEXT", "sentence", {"no_loss": True}), prompt[2])
    assert t.decoder[3] == Slot("TEXT", "label", {"closed_set": True})
    assert t.columns == {"sentence", "label"}


def test_attribute_values_are_typed():
    infill = Instruction.parse(PRESETS[3])
    assert infill.encoder_slots[1].attrs == {"mask_ratio": 0.3}
    assert Instruction.parse(PRESETS[4]).decoder_slots[0].attrs == {"preprocess": "text_phone"}
    tts = Instruction.parse(PRESETS[5])
    assert tts.encoder_slots == (Slot("PHONE", "text"),)
    assert tts.decoder_slots == (Slot("AUDIO", "fbank", {"adaptor": "audio_tgt_fbank"}),)
    motion = Instruction.parse(EXTENSIONS[9]).encoder_slots[0]
    assert motion.attrs == {"min_length": 10, "max_length": 200, "sample_rate": 2, "soft_trim": 0.5,
                            "window": True, "anchor_frame": 0}
    assert isinstance(motion.attrs["max_length"], int) and isinstance(motion.attrs["soft_trim"], float)
    huge = Instruction.parse("[TEXT:t,max_length=1" + "0" * 400 + "] ->")
    assert huge.encoder_slots[0].attrs["max_length"] == 10**400
    assert Instruction.parse(str(huge)) == huge


def test_attributes_without_a_column_and_aliases():
    t2i = Instruction.parse(OFASYS_DOCS[5]).decoder_slots
    assert t2i == (Slot("IMAGE", None, {"preprocess": "image_vqgan", "adaptor": "image_vqgan"}),)
    # the misspelling in one OFASys doc example and 'adapter' are stored as the canonical names
    alias = Instruction.parse("-> [IMAGE,preprocessor=a,adapter=b]").decoder_slots[0]
    assert alias.attrs == {"preprocess": "a", "adaptor": "b"}
    assert str(alias) == "[IMAGE,adaptor=b,preprocess=a]"
    spaced = Instruction.parse(EXTENSIONS[11]).encoder_slots[0]
    assert spaced == Slot("TEXT", "col", {"no_loss": True, "max_length": 7})


def test_repetition_groups():
    det = Instruction.parse(EXTENSIONS[0]).templates[0]
    assert det.decoder == (Slot("BOX", "boxes", repeat=0), Slot("TEXT", "labels", repeat=0))
    assert det.encoder[0].repeat is None
    several = Instruction.parse(EXTENSIONS[1]).templates[0]
    assert [(str(s), s.repeat) for s in several.encoder] == [
        ("[IMAGE:img]", None), ("[BOX:b]", 0), ("is", 0), ("[TEXT:t]", 0), (",", 0),
        ("and", None), ("[BOX:c]", 1),
    ]
    assert several.decoder == (Slot("TEXT", "u", repeat=2),)
    assert str(several) == "[IMAGE:img] ( [BOX:b] is [TEXT:t] , )* and ( [BOX:c] )* -> ( [TEXT:u] )*"
    # a '(' not followed by '[' and a ')' not followed by '*' are prompt text, also inside a group
    paren = Instruction.parse(EXTENSIONS[7]).encoder_slots
    assert paren[0] == lit("what (if any) is shown?")
    inner = Instruction.parse(EXTENSIONS[8]).encoder_slots
    assert inner[1:] == (Slot("TEXT", "q", repeat=0), lit("(optional) )", repeat=0))


def test_templates_sides_and_sampling():
    ist = Instruction.parse(EXTENSIONS[5])
    assert len(ist.templates) == 3
    assert ist.templates[2] == Template((), (Slot("TEXT", "cap"),))
    assert ist.encoder_slots == ist.templates[0].encoder
    assert Instruction.parse("[TEXT:x] ->").templates[0] == Template((Slot("TEXT", "x"),), ())
    assert str(Instruction.parse(" ->  ")) == "->"
    rng = random.Random(0)
    seen = {id(ist.sample_template(rng)) for _ in range(60)}
    assert seen == {id(t) for t in ist.templates}
    assert ist.sample_template(random.Random(3)) is ist.sample_template(random.Random(3))


def test_quoted_values():
    ist = Instruction.parse(EXTENSIONS[10], modalities=CUSTOM)
    # '->' and '|||' inside quotes do not split the instruction
    assert ist.encoder_slots[0].attrs == {"prompt": 'a, b ] = c -> d " e \\ |||'}
    assert ist.decoder_slots[0].attrs == {"prompt": "", "weight": 1e-3}
    bare = Instruction.parse('[NOTE,prompt="abc",weight="2"] ->', modalities=CUSTOM)
    assert str(bare) == "[NOTE,prompt=abc,weight=2.0] ->"


def test_slots_are_immutable_values():
    slot = Slot("TEXT", "x", {"no_loss": True, "max_length": 3})
    assert list(slot.attrs) == ["max_length", "no_loss"]  # sorted, so equal slots print equally
    with pytest.raises(TypeError):
        slot.attrs["no_loss"] = False  # type: ignore[index]
    assert hash(slot) == hash(Slot("TEXT", "x", {"max_length": 3, "no_loss": True}))


def test_custom_modalities_replace_the_builtins():
    mods = {"TEXT": {}, "POINT": {"radius": AttrSpec("int", 0)}}
    ist = Instruction.parse("[POINT:p,radius=2] where? -> [TEXT:t]", modalities=mods)
    assert ist.encoder_slots[0] == Slot("POINT", "p", {"radius": 2})
    assert "known: POINT, TEXT" in str(fault("[IMAGE:i] ->", modalities=mods))
    assert "known: none" in str(fault("[TEXT:t,no_loss] ->", modalities=mods))


# (instruction, caret line under the fault, words of the message)
ERRORS = [
    ("[FOO:x] -> [TEXT]", " ^", "unknown modality 'FOO'; known: AUDIO, BOX, CATEGORY, IMAGE"),
    ("[image:x] ->", " ^", "unknown modality 'image'"),
    ("[:x] ->", " ^", "missing modality name"),
    ("[] -> [TEXT]", "^", "empty slot"),
    ("a [ ] ->", "  ^", "empty slot"),
    ("[TEXT:a -> [TEXT]", "           ^", "nested '['"),
    ("[IMAGE] -> [TEXT:cap", "           ^", "never closed with ']'"),
    ("what ] -> [TEXT]", "     ^", "unbalanced ']'"),
    ("[IMAGE] what?", "^", "no '->'"),
    ("a -> b |||   c d", "             ^", "no '->'"),
    ("a -> b ||| ", "       ^", "empty template after '|||'"),
    ("a -> b -> c", "       ^", "exactly one '->'"),
    ("-> ( [BOX] [TEXT] )", "   ^", "not closed with ')*'"),
    ("( [BOX] -> [TEXT] )*", "^", "not closed with ')*'"),
    ("-> [BOX] [TEXT] )*", "                ^", "never opened"),
    ("-> ( [BOX] ( [TEXT] )* )*", "           ^", "cannot be nested"),
    ("[TEXT:a,foo] ->", "        ^", "unknown attribute 'foo' for TEXT; known: adaptor, closed_set"),
    ("[AUDIO:a,closed_set] ->", "         ^", "unknown attribute 'closed_set' for AUDIO"),
    ("[TEXT:a,no_loss,no_loss] ->", "                ^", "duplicate attribute 'no_loss'"),
    ("[IMAGE,adaptor=x,adapter=y] ->", "                 ^", "duplicate attribute 'adaptor'"),
    ("[TEXT:a,mask_ratio=1.7] ->", "                   ^", "'mask_ratio': expected float in [0, 1]"),
    ("[TEXT:a,max_length=-3] ->", "                   ^", "expected int >= 1, got '-3'"),
    ("[TEXT:a,max_length=abc] ->", "                   ^", "expected int >= 1, got 'abc'"),
    ("[TEXT:a,max_length=1.5] ->", "                   ^", "bad value for 'max_length'"),
    ("[MOTION:m,soft_trim=1.0] ->", "                    ^", "expected float in (0, 1)"),
    ("[TEXT:a,no_loss=yes] ->", "                ^", "is a flag and takes no value"),
    ("[TEXT:a,max_length] ->", "        ^", "needs a value (int >= 1)"),
    ("[TEXT:a,max_length=] ->", "                   ^", "missing value"),
    ("[TEXT:a,,no_loss] ->", "        ^", "empty attribute"),
    ("[TEXT:a,no-loss] ->", "        ^", "bad attribute name 'no-loss'"),
    ("[TEXT:] ->", "      ^", "bad column name ''"),
    ("[TEXT:a b] ->", "      ^", "bad column name 'a b'"),
    ("[TEXT:no_loss=1] ->", "      ^", "first item after ':' is the column name"),
    ('[TEXT,preprocess="x] ->', "                 ^", "unterminated quoted value"),
    ('[TEXT,preprocess="a b"] ->', "                 ^", "expected a name"),
    ("[TEXT,preprocess=a b] ->", "                  ^", "not allowed in a bare value; quote it"),
    ('[TEXT,preprocess=a"b"] ->', "                  ^", "not allowed in a bare value"),
    ('[TEXT,preprocess="a"b] ->', "                    ^", "unexpected text after the quoted value"),
    ('[NOTE,prompt="a\\nb"] ->', "               ^", "unknown escape"),
    ("[NOTE,weight=inf] ->", "             ^", "bad value for 'weight'"),
    ("[TEXT,max_length=" + "9" * 5000 + "] ->", "                 ^", "bad value for 'max_length'"),
]


@pytest.mark.parametrize(("text", "caret", "message"), ERRORS)
def test_errors_point_at_the_fault(text, caret, message):
    err = fault(text, modalities=CUSTOM)
    assert isinstance(err, ValueError)
    assert err.instruction == text and err.position == caret.index("^")
    first, line, caret_line = str(err).splitlines()[:3]
    assert message in first and err.message in first
    assert line == "    " + text and caret_line == "    " + caret


def test_error_shows_the_line_of_a_multi_line_instruction():
    err = fault("[IMAGE:i] describe ->\n[TEXT:c] ->\n[TEXT:d]")
    assert err.position == 31
    assert str(err).splitlines()[1:] == ["    [TEXT:c] ->", "             ^"]


def test_a_lone_surrogate_in_the_instruction_is_refused_where_it_stands():
    """Literal text that is not valid UTF-8 would otherwise fail every row of the task, when the
    tokenizer meets it; the error prints (the surrogate shown as '?')."""
    err = fault("[TEXT:x] what \ud800? -> [TEXT:y]")
    assert err.position == 14 and "lone surrogate U+D800" in err.message
    assert str(err).splitlines()[1:] == ["    [TEXT:x] what ?? -> [TEXT:y]", "                  ^"]
    str(err).encode("utf-8")


# Fuzzing: text made of grammar pieces hits deep error paths; plain st.text() hits everything else.
PIECES = st.sampled_from([
    "[", "]", "(", ")", ")*", "( [", "->", "|||", "|", ":", ",", "=", '"', "\\", " ", "\n", "*",
    "[TEXT", "[IMAGE:", "[BOX]", "[MOTION,", "no_loss", "max_length=", "mask_ratio=0.5", "soft_trim=",
    "adapter=", "col", "a", "Z", "7", "-", ".", "1e9", "é", "\t",
])
NOISY_TEXT = st.one_of(
    st.lists(st.one_of(PIECES, st.text(alphabet='[]():,=->|*" \\abcTEXT019', max_size=4)), max_size=25)
    .map("".join),
    st.text(max_size=60),
)


@settings(max_examples=300, deadline=None)
@given(text=NOISY_TEXT)
def test_any_text_parses_and_round_trips_or_raises_instruction_error(text):
    try:
        ist = Instruction.parse(text, modalities=CUSTOM)
    except InstructionError as err:
        assert 0 <= err.position <= len(text)
        assert str(err).splitlines()[-1].strip() == "^"
        return
    assert Instruction.parse(str(ist), modalities=CUSTOM) == ist


# Valid instructions built from parts, with the structure the parser must return.
SEP = st.sampled_from([" ", "  ", "\n", "\t ", " \n "])
TIGHT = st.sampled_from(["", " ", "\n"])
NAME_CHARS = "abzAZ019_.+/-"
COLUMN_CHARS = "abzAZ019_.-"
WORD = st.text(alphabet="abXY09?.,\"':;!-|()*>=/", min_size=1, max_size=5)
LITERAL = st.lists(WORD, min_size=1, max_size=3).map(" ".join).filter(
    lambda s: "->" not in s and "|||" not in s and ")*" not in s and not s.endswith("(")
)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def attribute(name: str, spec: AttrSpec) -> st.SearchStrategy[tuple[str, object, str]]:
    """(stored name, value, written item) of one valid attribute."""
    if spec.kind == "flag":
        return st.just((name, True, name))
    values, fmt = {
        "int": (st.integers(int(spec.minimum or 0), 10**6 if spec.maximum is None else int(spec.maximum)), str),
        # finite only: the parser refuses inf, which would not print back as written
        "float": (st.floats(spec.minimum, spec.maximum, exclude_min=not spec.inclusive,
                            exclude_max=not spec.inclusive, allow_nan=False, allow_infinity=False), repr),
        "name": (st.text(NAME_CHARS, min_size=1, max_size=10), str),
        "str": (st.text(max_size=10), quote),  # always quoted, even when a bare value would do
    }[spec.kind]
    spelling = st.sampled_from(["adaptor", "adapter"]) if name == "adaptor" else st.just(name)
    return st.tuples(spelling, values).map(lambda sv: (name, sv[1], f"{sv[0]}={fmt(sv[1])}"))


# Strategies are built once: building them inside @composite draws costs more than the drawing.
SLOT_HEAD = st.one_of([
    st.tuples(st.just(m), st.lists(st.one_of([attribute(n, s) for n, s in specs.items()]), max_size=3,
                                   unique_by=lambda a: a[0]))
    for m, specs in sorted(CUSTOM.items())
])
COLUMN = st.none() | st.builds(str.__add__, st.sampled_from("aZ0_"), st.text(COLUMN_CHARS, max_size=5))


def render_slot(head: tuple[str, list], column: str | None, pad: str) -> tuple[str, str | None, dict, str]:
    """(modality, column, attrs, written slot), with optional spaces around the items."""
    modality, attributes = head
    items = [modality + (f":{column}" if column is not None else "")] + [w for _, _, w in attributes]
    written = "[" + ",".join(pad + i + pad for i in items) + "]"
    return modality, column, {n: v for n, v, _ in attributes}, written


DATA_SLOT = st.builds(render_slot, SLOT_HEAD, COLUMN, st.sampled_from(["", " "]))
BOOL = st.booleans()
COUNT = st.integers(0, 4)


@st.composite
def sentence(draw, n_groups: list[int]) -> tuple[list[Slot], str]:
    """Elements of one side; ``n_groups`` counts the template's groups so far (updated)."""
    slots: list[Slot] = []
    parts: list[str] = []

    def add(repeat: int | None, allow_literal: bool) -> None:
        if allow_literal and draw(BOOL):
            text = draw(LITERAL)
            if slots and slots[-1].is_literal and slots[-1].repeat == repeat:  # pieces merge
                slots[-1] = lit(slots[-1].text + " " + text, repeat)
                parts[-1] += " " + text
                return
            slots.append(lit(text, repeat))
            parts.append(text)
        else:
            modality, column, attrs, text = draw(DATA_SLOT)
            slots.append(Slot(modality, column, attrs, repeat=repeat))
            parts.append(text)

    for _ in range(draw(COUNT)):
        if draw(COUNT) == 0:
            repeat = n_groups[0]
            n_groups[0] += 1
            parts.append("(" + draw(TIGHT))
            add(repeat, allow_literal=False)  # a group starts with a slot
            for _ in range(draw(COUNT)):
                add(repeat, allow_literal=True)
            parts.append(draw(TIGHT) + ")*")
        else:
            add(None, allow_literal=True)
    return slots, "".join(p + draw(SEP) for p in parts)


@st.composite
def instruction(draw) -> tuple[Instruction, str]:
    templates, texts = [], []
    for _ in range(1 + draw(COUNT) % 3):
        n_groups = [0]
        enc, enc_text = draw(sentence(n_groups))
        dec, dec_text = draw(sentence(n_groups))
        templates.append(Template(tuple(enc), tuple(dec)))
        texts.append(draw(SEP) + enc_text + "->" + draw(SEP) + dec_text)
    return Instruction(tuple(templates)), "|||".join(texts)


@settings(max_examples=300, deadline=None)
@given(case=instruction())
def test_valid_instructions_parse_to_their_parts_and_round_trip(case):
    expected, text = case
    assert Instruction.parse(text, modalities=CUSTOM) == expected
    assert Instruction.parse(str(expected), modalities=CUSTOM) == expected


def test_attribute_bounds_are_the_documented_ones():
    """Each bound of a builtin attribute is pinned at its edge: the edge itself parses, one step past
    it is refused (the error tests above only try values far outside)."""
    assert Instruction.parse("[TEXT:t,noise_ratio=1.0,mask_ratio=0] ->").encoder_slots[0].attrs == {
        "noise_ratio": 1.0, "mask_ratio": 0.0}
    assert "expected float in [0, 1]" in fault("[TEXT:t,noise_ratio=1.5] ->").message
    assert "expected float in [0, 1]" in fault("[TEXT:t,noise_ratio=-0.1] ->").message
    # a bag-of-words vocabulary holds at most 2**16 words
    assert Instruction.parse("[TEXT:t,vocab_size=65536] ->").encoder_slots[0].attrs == {"vocab_size": 65536}
    assert "expected int in [1, 65536]" in fault("[TEXT:t,vocab_size=65537] ->").message
    assert "expected int in [1, 65536]" in fault("[TEXT:t,vocab_size=0] ->").message


def test_a_modality_own_attribute_wins_over_an_alias():
    """'adapter' becomes 'adaptor' only for a modality that has no attribute 'adapter' of its own."""
    mods = {"X": {"adapter": AttrSpec("name"), "adaptor": AttrSpec("name")}}
    slot = Instruction.parse("[X,adapter=a,adaptor=b] ->", modalities=mods).encoder_slots[0]
    assert slot.attrs == {"adapter": "a", "adaptor": "b"}
