"""The embedded text-audio corpus ``instruments``, rendered offline from two Debian packages.

Clips (16 kHz mono wav, ``CLIP_SECONDS`` long):

* **Instruments**: each of the 128 General MIDI programs of ``timgm6mb-soundfont``
  (``/usr/share/sounds/sf2/TimGM6mb.sf2``), rendered by the ``fluidsynth`` command line from a
  MIDI file written here (pure Python SMF writer), in every combination of
  register (low / middle / high: MIDI note 36 / 60 / 84, shifted per family into a playable
  range), loudness (soft / loud: velocity 40 / 112) and articulation (short: four staccato
  notes of an arpeggio; sustained: one note held 1.2 s). 128 x 3 x 2 x 2 = 1,536 clips.
  One fluidsynth process renders the 12 clips of one program into one file (reverb and chorus
  off, an "all sound off" between clips), which is cut into clips; two processes run at a time.
* **Event sounds**: the 35 named sounds of ``sound-theme-freedesktop``
  (``/usr/share/sounds/freedesktop/stereo/*.oga``), copied as they are (the audio loader
  resamples them).

Texts (``kind=query``, deterministic): every instrument clip is described by its instrument
name, GM family, register, loudness and articulation, in several phrasings; every event sound
by its name (``dialog-warning`` -> "a dialog warning sound", with per-sound descriptions of
what is heard). No two items share a text.

Split (honest): phrasings are sentence *templates* in three disjoint sets. Every ``train``
text of an item uses a train template, its ``val`` text a val template and its ``test`` text a
test template (picked per item by a hash), so no held-out sentence is ever a training text
(``find_leaks`` reports 0). Attribute words come with three synonyms ("soft" / "quiet" /
"gentle", "short staccato notes" / "brief detached notes" / "quick clipped notes" ...), one
picked per text by a hash; training texts use only the first two, so about a third of the
attribute words in held-out queries were never seen in training (a frozen pretrained text
encoder reads them; an encoder trained from scratch has to guess).

``templates=False`` keeps only the first train template (one training text per item).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.data.corpus import MEDIA_DIR, Corpus, Item, Text, write_corpus
from cart_jax.data.datasets import MissingDependencyError

SOUNDFONT = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")
EVENT_DIR = Path("/usr/share/sounds/freedesktop/stereo")
INSTALL_HINT = ("apt-get install --no-install-recommends fluidsynth timgm6mb-soundfont "
                "sound-theme-freedesktop")
SAMPLE_RATE = 16000
CLIP_SECONDS = 1.5
SLOT_SECONDS = 2.0  # clip + silence before the next clip of a program's render
GAIN = 1.5

GM_PROGRAMS = (
    "acoustic grand piano", "bright acoustic piano", "electric grand piano", "honky-tonk piano",
    "electric piano 1", "electric piano 2", "harpsichord", "clavinet",
    "celesta", "glockenspiel", "music box", "vibraphone",
    "marimba", "xylophone", "tubular bells", "dulcimer",
    "drawbar organ", "percussive organ", "rock organ", "church organ",
    "reed organ", "accordion", "harmonica", "tango accordion",
    "nylon string guitar", "steel string guitar", "jazz electric guitar", "clean electric guitar",
    "muted electric guitar", "overdriven guitar", "distortion guitar", "guitar harmonics",
    "acoustic bass", "fingered electric bass", "picked electric bass", "fretless bass",
    "slap bass 1", "slap bass 2", "synth bass 1", "synth bass 2",
    "violin", "viola", "cello", "contrabass",
    "tremolo strings", "pizzicato strings", "orchestral harp", "timpani",
    "string ensemble 1", "string ensemble 2", "synth strings 1", "synth strings 2",
    "choir aahs", "voice oohs", "synth voice", "orchestra hit",
    "trumpet", "trombone", "tuba", "muted trumpet",
    "french horn", "brass section", "synth brass 1", "synth brass 2",
    "soprano sax", "alto sax", "tenor sax", "baritone sax",
    "oboe", "english horn", "bassoon", "clarinet",
    "piccolo", "flute", "recorder", "pan flute",
    "blown bottle", "shakuhachi", "whistle", "ocarina",
    "square wave lead", "sawtooth wave lead", "calliope lead", "chiff lead",
    "charang lead", "voice lead", "fifths lead", "bass and lead",
    "new age pad", "warm pad", "polysynth pad", "choir pad",
    "bowed pad", "metallic pad", "halo pad", "sweep pad",
    "rain effect", "soundtrack effect", "crystal effect", "atmosphere effect",
    "brightness effect", "goblins effect", "echoes effect", "sci-fi effect",
    "sitar", "banjo", "shamisen", "koto",
    "kalimba", "bagpipe", "fiddle", "shanai",
    "tinkle bell", "agogo", "steel drums", "woodblock",
    "taiko drum", "melodic tom", "synth drum", "reverse cymbal",
    "guitar fret noise", "breath noise", "seashore", "bird tweet",
    "telephone ring", "helicopter", "applause", "gunshot",
)
GM_FAMILIES = (
    "piano", "chromatic percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth lead", "synth pad", "synth effects", "ethnic", "percussive",
    "sound effects",
)
REGISTERS = {"low": 36, "middle": 60, "high": 84}  # MIDI root note
# Programs whose TimGM6mb samples stop below the high register (silent at note 84).
HIGH_ROOT_CAP = {67: 72, 78: 72}  # baritone sax, whistle
LOUDNESS = {"soft": 40, "loud": 112}  # MIDI velocity
ARTICULATIONS = ("short", "sustained")

# Phrasings of each attribute: (adjective / phrase, adverb or short form), each with synonyms.
# Every text picks one synonym per attribute by a hash of (item, template). Training texts use
# the first two; held-out texts any of the three, so about a third of their attribute words
# never occur in training ("gentle", "strongly", "a single lingering note", "treble range" ...).
ATTRIBUTE_WORDS = {
    "low": (("low", "low register"), ("low-pitched", "lower register"), ("deep", "bass range")),
    "middle": (("middle", "middle register"), ("mid-pitched", "mid range"),
               ("medium", "medium pitch")),
    "high": (("high", "high register"), ("high-pitched", "upper register"),
             ("treble", "treble range")),
    "soft": (("soft", "softly"), ("quiet", "quietly"), ("gentle", "gently")),
    "loud": (("loud", "loudly"), ("forceful", "forcefully"), ("strong", "strongly")),
    "short": (("short staccato notes", "staccato"), ("brief detached notes", "choppy"),
              ("quick clipped notes", "clipped")),
    "sustained": (("one sustained note", "sustained"), ("a long held tone", "held"),
                  ("a single lingering note", "lingering")),
}


TRAIN_SYNONYMS = 2  # training texts use ATTRIBUTE_WORDS[...][:2]; held-out texts all three


def _words(attrs: dict, salt: str) -> dict:
  """Template fields of one clip; synonyms picked by a hash of (item id, salt)."""
  name = attrs["name"]
  out = {"name": name, "a_name": ("an " if name[0] in "aeiou" else "a ") + name,
         "family": attrs["family"]}
  for field, key, slots in (("register", "reg", ("reg", "reg2")),
                            ("loudness", "loud", ("loud", "loudly")),
                            ("articulation", "artic", ("artic", "artic2"))):
    options = ATTRIBUTE_WORDS[attrs[field]]
    if salt.startswith("train"):
      options = options[:TRAIN_SYNONYMS]
    choice = options[_hash_rank(attrs["id"], f"{salt}:{key}") % len(options)]
    out.update(zip(slots, choice))
  return out


TRAIN_TEMPLATES = (
    "{name}, {reg}, {loud}, {artic}",
    "a {loud} {name} playing {artic} in the {reg2}",
    "{artic2} {reg} {name} played {loudly}",
    "the sound of {a_name} ({family}), {reg2}, {loud}, {artic}",
    "{family} instrument {name}: {artic}, {reg}, {loud}",
    "{loud} {reg} {artic2} {name}",
)
VAL_TEMPLATES = (
    "{name} heard {loudly}, {artic}, {reg}",
)
TEST_TEMPLATES = (
    "a {reg} {name} with {artic}, {loud}",
    "{loudly} played {artic2} {name}, {reg2}",
)

# Freedesktop event sounds: name -> what is heard (one description per sound; the name itself
# gives the other wordings).
EVENT_DESCRIPTIONS = {
    "alarm-clock-elapsed": "an alarm clock ringing",
    "audio-channel-front-center": "a voice saying front center",
    "audio-channel-front-left": "a voice saying front left",
    "audio-channel-front-right": "a voice saying front right",
    "audio-channel-rear-center": "a voice saying rear center",
    "audio-channel-rear-left": "a voice saying rear left",
    "audio-channel-rear-right": "a voice saying rear right",
    "audio-channel-side-left": "a voice saying side left",
    "audio-channel-side-right": "a voice saying side right",
    "audio-test-signal": "a speaker test signal",
    "audio-volume-change": "a tiny click when the volume changes",
    "bell": "a short bell ding",
    "camera-shutter": "a camera shutter clicking",
    "complete": "a chime telling that something completed",
    "device-added": "a blip when a device is plugged in",
    "device-removed": "a blip when a device is unplugged",
    "dialog-error": "an error dialog alert",
    "dialog-information": "a soft information dialog tick",
    "dialog-warning": "a warning dialog alert",
    "message-new-instant": "an instant message notification",
    "message": "a message notification",
    "network-connectivity-established": "a network connected notification",
    "network-connectivity-lost": "a network lost notification",
    "phone-incoming-call": "a phone ringing for an incoming call",
    "phone-outgoing-busy": "a busy phone line tone",
    "phone-outgoing-calling": "the ringback tone of an outgoing phone call",
    "power-plug": "a sound when the power cable is plugged in",
    "power-unplug": "a sound when the power cable is unplugged",
    "screen-capture": "a screenshot camera click",
    "service-login": "a login jingle",
    "service-logout": "a logout jingle",
    "suspend-error": "an error when the computer cannot suspend",
    "trash-empty": "paper crumpling as the trash is emptied",
    "window-attention": "a window asking for attention",
    "window-question": "a window asking a question",
}
EVENT_TRAIN_TEMPLATES = ("{words} sound", "{desc}", "the {words} event sound")
EVENT_VAL_TEMPLATES = ("desktop notification: {words}",)
EVENT_TEST_TEMPLATES = ("what you hear on {words}", "system sound for {words}")


@dataclasses.dataclass(frozen=True)
class InstrumentsStats:
  instrument_clips: int
  event_sounds: int
  silent_clips: int
  fluidsynth_processes: int
  seconds_render: float
  seconds: float


def check_tools() -> str:
  """Path of the ``fluidsynth`` binary; RuntimeError naming what to install if anything is missing."""
  missing = []
  binary = shutil.which("fluidsynth")
  if binary is None:
    missing.append("the fluidsynth command (Debian package fluidsynth)")
  if not SOUNDFONT.is_file():
    missing.append(f"the soundfont {SOUNDFONT} (Debian package timgm6mb-soundfont)")
  if not EVENT_DIR.is_dir() or not any(EVENT_DIR.glob("*.oga")):
    missing.append(f"the event sounds in {EVENT_DIR} (Debian package sound-theme-freedesktop)")
  if missing:
    raise MissingDependencyError("the instruments corpus needs " + "; ".join(missing) +
                                 f". Install them with: {INSTALL_HINT}")
  return binary


# ----------------------------------------------------------------------------- MIDI


def _vlq(n: int) -> bytes:
  """MIDI variable-length quantity."""
  out = [n & 0x7F]
  n >>= 7
  while n:
    out.append(0x80 | (n & 0x7F))
    n >>= 7
  return bytes(reversed(out))


def midi_file(events: list[tuple[int, bytes]], ticks_per_quarter: int = 480,
              tempo_us: int = 500_000) -> bytes:
  """A format-0 Standard MIDI File of (absolute tick, channel message) events."""
  track = b"\x00\xff\x51\x03" + tempo_us.to_bytes(3, "big")  # tempo
  last = 0
  for tick, msg in sorted(events, key=lambda e: e[0]):  # stable: same-tick order kept
    track += _vlq(tick - last) + msg
    last = tick
  track += b"\x00\xff\x2f\x00"  # end of track
  header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks_per_quarter)
  return header + b"MTrk" + struct.pack(">I", len(track)) + track


TICKS_PER_SECOND = 960  # 480 ticks per quarter at 120 bpm


def _root_note(program: int, register: str) -> int:
  """Root note of a register, moved into a sensible range for basses and high instruments."""
  family = GM_FAMILIES[program // 8]
  root = REGISTERS[register]
  if family == "bass":
    root -= 12
  elif family == "pipe" and register == "low":
    root += 12
  if register == "high":
    root = min(root, HIGH_ROOT_CAP.get(program, root))
  return int(np.clip(root, 24, 96))


def clip_events(program: int, register: str, loudness: str, articulation: str,
                start_tick: int) -> list[tuple[int, bytes]]:
  """MIDI messages of one clip on channel 0 starting at ``start_tick``."""
  root = _root_note(program, register)
  vel = LOUDNESS[loudness]
  t = lambda s: start_tick + int(round(s * TICKS_PER_SECOND))
  ev = [(start_tick, bytes([0xC0, program]))]
  if articulation == "short":
    for k, step in enumerate((0, 4, 7, 12)):  # major arpeggio, 0.1 s notes every 0.35 s
      ev += [(t(0.35 * k), bytes([0x90, root + step, vel])),
             (t(0.35 * k + 0.1), bytes([0x80, root + step, 0]))]
  else:
    ev += [(t(0.0), bytes([0x90, root, vel])), (t(1.2), bytes([0x80, root, 0]))]
  ev.append((t(SLOT_SECONDS - 0.05), bytes([0xB0, 120, 0])))  # all sound off before the next clip
  return ev


def instrument_items(limit: int | None = None) -> list[dict]:
  """Attributes of every instrument clip, in (program, register, loudness, articulation) order."""
  out = []
  for program, name in enumerate(GM_PROGRAMS):
    for register in REGISTERS:
      for loudness in LOUDNESS:
        for articulation in ARTICULATIONS:
          out.append({"id": f"gm{program:03d}-{register}-{loudness}-{articulation}",
                      "program": program, "name": name, "family": GM_FAMILIES[program // 8],
                      "register": register, "loudness": loudness, "articulation": articulation})
  return out[:limit] if limit is not None else out


def _render_program(binary: str, clips: list[dict], workdir: Path) -> dict[str, np.ndarray]:
  """Renders the clips of one program with one fluidsynth process; returns id -> int16 wave."""
  import soundfile as sf  # pylint: disable=g-import-not-at-top

  slot = int(round(SLOT_SECONDS * TICKS_PER_SECOND))
  events = []
  for k, c in enumerate(clips):
    events += clip_events(c["program"], c["register"], c["loudness"], c["articulation"], k * slot)
  tag = clips[0]["id"].split("-")[0]
  mid, wav = workdir / f"{tag}.mid", workdir / f"{tag}.wav"
  mid.write_bytes(midi_file(events))
  cmd = [binary, "-ni", "-q", "-R", "0", "-C", "0", "-g", str(GAIN), "-r", str(SAMPLE_RATE),
         "-F", str(wav), str(SOUNDFONT), str(mid)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0 or not wav.is_file():
    raise RuntimeError(f"fluidsynth failed on {mid} (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-500:]}")
  data, rate = sf.read(str(wav), dtype="int16", always_2d=True)  # [n, channels]
  if rate != SAMPLE_RATE:
    raise RuntimeError(f"fluidsynth wrote {wav} at {rate} Hz, expected {SAMPLE_RATE}")
  mono = data.astype(np.int32).mean(axis=1).astype(np.int16)  # [n]
  n, step = int(CLIP_SECONDS * SAMPLE_RATE), int(SLOT_SECONDS * SAMPLE_RATE)
  out = {}
  for k, c in enumerate(clips):
    seg = mono[k * step:k * step + n]
    out[c["id"]] = np.pad(seg, (0, n - seg.shape[0]))
  return out


def render_instruments(clips: list[dict], progress: Callable[[int], None] | None = None,
                       workers: int = 2) -> dict[str, np.ndarray]:
  """id -> int16 mono wave ``[CLIP_SECONDS * SAMPLE_RATE]`` for every clip (one process per program)."""
  binary = check_tools()
  groups: dict[int, list[dict]] = {}
  for c in clips:
    groups.setdefault(c["program"], []).append(c)
  waves: dict[str, np.ndarray] = {}
  with tempfile.TemporaryDirectory(prefix="cart-fluidsynth-") as tmp:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      futures = [pool.submit(_render_program, binary, g, Path(tmp)) for g in groups.values()]
      for f in concurrent.futures.as_completed(futures):
        res = f.result()
        waves.update(res)
        if progress is not None:
          progress(len(res))
  return waves


# ----------------------------------------------------------------------------- texts


def _hash_rank(item_id: str, salt: str) -> int:
  return int.from_bytes(hashlib.sha256(f"{item_id}\x00{salt}".encode()).digest()[:8], "big")


def _pick(templates: tuple[str, ...], item_id: str, salt: str) -> str:
  return templates[_hash_rank(item_id, salt) % len(templates)]


def instrument_texts(attrs: dict, templates: bool = True) -> list[Text]:
  """The train/val/test texts of one instrument clip (see the module docstring)."""
  iid = attrs["id"]
  train = TRAIN_TEMPLATES if templates else TRAIN_TEMPLATES[:1]
  out = [Text(iid, t.format(**_words(attrs, f"train{k}")), "train", "query", f"template:train{k}")
         for k, t in enumerate(train)]
  out.append(Text(iid, _pick(VAL_TEMPLATES, iid, "val").format(**_words(attrs, "val")), "val",
                  "query", "template:val"))
  out.append(Text(iid, _pick(TEST_TEMPLATES, iid, "test").format(**_words(attrs, "test")), "test",
                  "query", "template:test"))
  return out


def event_texts(name: str, templates: bool = True) -> list[Text]:
  """The train/val/test texts of one freedesktop event sound."""
  iid = f"event-{name}"
  fields = {"words": name.replace("-", " "), "desc": EVENT_DESCRIPTIONS.get(name, name.replace("-", " "))}
  train = EVENT_TRAIN_TEMPLATES if templates else EVENT_TRAIN_TEMPLATES[:1]
  out = [Text(iid, t.format(**fields), "train", "query", f"event:train{k}")
         for k, t in enumerate(train)]
  out.append(Text(iid, _pick(EVENT_VAL_TEMPLATES, iid, "val").format(**fields), "val", "query",
                  "event:val"))
  out.append(Text(iid, _pick(EVENT_TEST_TEMPLATES, iid, "test").format(**fields), "test", "query",
                  "event:test"))
  return out


def event_sounds() -> list[tuple[str, Path]]:
  """(name, file) of the freedesktop event sounds, sorted by name."""
  return sorted((p.name[:-len(p.suffix)], p) for p in EVENT_DIR.glob("*.oga"))


# ----------------------------------------------------------------------------- corpus


def prepare_instruments(out_dir: str | os.PathLike, *, limit: int | None = None,
                        size: int | None = None, templates: bool = True, overwrite: bool = False,
                        progress: bool = True) -> tuple[Corpus, InstrumentsStats]:
  """Renders the instruments corpus into ``out_dir`` (atomically). Returns the corpus and stats.

  Args:
    limit: keep only the first ``limit`` items: instrument clips in program order, then event
      sounds: a proportional share of event sounds (at least one) and instrument clips spread
      evenly over the grid, so small corpora still have both kinds.
    size: not used (clips are 16 kHz, 1.5 s); must be None.
    templates: False keeps one training text per item.
    progress: a progress bar on stderr while rendering.
  """
  if size is not None:
    raise CartError(f"--size does not apply to the instruments corpus (16 kHz, {CLIP_SECONDS} s "
                    f"clips), got {size}")
  if limit is not None and limit < 1:
    raise CartError(f"--limit must be positive, got {limit}")
  t0 = time.perf_counter()
  check_tools()  # fail before any work, naming what to install
  events = event_sounds()
  all_clips = instrument_items()
  if limit is None:
    clips = all_clips
  else:
    # A proportional share of event sounds (at least one when limit >= 2), the rest
    # instrument clips spread evenly over the (program, register, loudness, articulation) grid.
    n_events = 0 if limit < 2 else min(len(events), max(1, limit * len(events) // (len(all_clips) + len(events))))
    n_clips = limit - n_events
    pick = np.linspace(0, len(all_clips) - 1, n_clips).round().astype(int) if n_clips else []
    clips = [all_clips[i] for i in sorted(set(int(i) for i in pick))]
    events = events[:n_events]
  bar = None
  if progress:
    import sys  # pylint: disable=g-import-not-at-top

    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(clips), desc="rendering clips (fluidsynth)", file=sys.stderr,
               dynamic_ncols=True, leave=False)
  t1 = time.perf_counter()
  try:
    waves = render_instruments(clips, progress=bar.update if bar is not None else None)
  finally:
    if bar is not None:
      bar.close()
  seconds_render = time.perf_counter() - t1
  silent = sum(int(np.abs(w).max() == 0) for w in waves.values())

  items = [Item(c["id"], "audio", f"{MEDIA_DIR}/{c['id']}.wav") for c in clips]
  items += [Item(f"event-{name}", "audio", f"{MEDIA_DIR}/event-{name}.oga") for name, _ in events]
  texts = [t for c in clips for t in instrument_texts(c, templates)]
  texts += [t for name, _ in events for t in event_texts(name, templates)]

  def write_media(tmp: Path) -> None:
    import soundfile as sf  # pylint: disable=g-import-not-at-top
    (tmp / MEDIA_DIR).mkdir(parents=True, exist_ok=True)
    for c in clips:
      sf.write(str(tmp / MEDIA_DIR / f"{c['id']}.wav"), waves[c["id"]], SAMPLE_RATE, subtype="PCM_16")
    for name, path in events:
      shutil.copyfile(path, tmp / MEDIA_DIR / f"event-{name}.oga")

  meta = {"source": "General MIDI programs of timgm6mb-soundfont rendered by fluidsynth + "
                    "sound-theme-freedesktop event sounds (Debian)",
          "soundfont": str(SOUNDFONT), "event_dir": str(EVENT_DIR), "sample_rate": SAMPLE_RATE,
          "clip_seconds": CLIP_SECONDS, "gain": GAIN, "registers": REGISTERS, "loudness": LOUDNESS,
          "articulations": list(ARTICULATIONS), "templates": templates, "limit": limit,
          "train_templates": list(TRAIN_TEMPLATES), "val_templates": list(VAL_TEMPLATES),
          "test_templates": list(TEST_TEMPLATES)}
  corpus = write_corpus(out_dir, "instruments", "audio", items, texts, media_writer=write_media,
                        meta=meta, overwrite=overwrite)
  stats = InstrumentsStats(instrument_clips=len(clips), event_sounds=len(events), silent_clips=silent,
                           fluidsynth_processes=len({c["program"] for c in clips}),
                           seconds_render=round(seconds_render, 2),
                           seconds=round(time.perf_counter() - t0, 2))
  return corpus, stats


DEMO_RECIPE = {
    "dataset": "instruments",
    "experiment": "gin_configs/experiments/instruments_demo.gin",
    "embed": {"steps": 300},  # cart_jax.data.embeddings.BuiltinEmbedOptions
    "ids": {"n_clusters": 32, "num_levels": 2, "codebook_size": 32, "rq_steps": 300},  # IdentifierConfig
    "smoke_ids": {"n_clusters": 4, "num_levels": 1, "codebook_size": 8, "rq_steps": 50},
}


def keyword_captions(item_id: str) -> list[str]:
  """Tags and the file name of an item, as a corpus known only by keywords would have them
  (``cart demo --captions-only-items``, :mod:`cart_jax.data.protocols`).

  ``gm000-low-soft-short`` -> ``["acoustic grand piano, piano, low, soft, short",
  "gm000-low-soft-short.wav"]``; ``event-dialog-warning`` -> ``["dialog warning",
  "dialog-warning.oga"]``. Only the first (training) word of each attribute is used.
  """
  if item_id.startswith("event-"):
    name = item_id[len("event-"):]
    return [name.replace("-", " "), f"{name}.oga"]
  try:
    program_s, register, loudness, articulation = item_id.split("-")
    program = int(program_s[2:])
    name = GM_PROGRAMS[program]
  except (ValueError, IndexError):
    raise CartError(f"{item_id!r} is not an instruments item id (gmNNN-register-loudness-"
                    f"articulation or event-NAME)") from None
  tags = [name, GM_FAMILIES[program // 8], register, loudness, articulation]
  return [", ".join(tags), f"{item_id}.wav"]
