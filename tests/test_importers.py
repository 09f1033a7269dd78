"""Importers: each on a small fixture written in that data set's exact format, plus bad files."""
import csv
import json
import os
from pathlib import Path

import pytest

from cart_jax.data.corpus import CorpusFormatError, load_corpus
from cart_jax.data.importers import import_corpus

from helpers import data_cli as _cli


def _touch(path: Path, payload: bytes = b"media") -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(payload)
  return path


def _csv(path: Path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


# ------------------------------------------------------------------------------- karpathy


def _karpathy(tmp_path, coco=False):
  root = tmp_path / "images"
  images = []
  for i, split in enumerate(["train", "restval", "val", "test"]):
    fp = "val2014" if coco else None
    fn = f"COCO_val2014_{i:012d}.jpg" if coco else f"{1000 + i}.jpg"
    _touch(root / (fp or "") / fn, bytes([i]))
    img = {"filename": fn, "imgid": i, "split": split, "sentids": [2 * i, 2 * i + 1],
           "sentences": [{"tokens": ["a", "dog"], "raw": f"A dog number {i}.", "imgid": i,
                          "sentid": 2 * i},
                         {"tokens": ["a", "cat"], "raw": f"A cat  number {i}.", "imgid": i,
                          "sentid": 2 * i + 1}]}
    if coco:
      img.update(filepath=fp, cocoid=i)
    images.append(img)
  path = tmp_path / ("dataset_coco.json" if coco else "dataset_flickr30k.json")
  path.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr30k"}))
  return path, root, images


@pytest.mark.parametrize("coco", [False, True])
def test_karpathy(tmp_path, coco):
  path, root, _ = _karpathy(tmp_path, coco)
  corpus, _ = import_corpus("karpathy", [path], tmp_path / "out", media_root=root)
  assert corpus.name == ("coco" if coco else "flickr30k") and corpus.modality == "image"
  assert len(corpus.items) == 4
  # restval -> train; two sentences per image
  assert corpus.counts() == {"train": {"query": 4, "caption": 0}, "val": {"query": 2, "caption": 0},
                             "test": {"query": 2, "caption": 0}}
  assert corpus.texts(split="test")[1].text == "A cat number 3."  # whitespace collapsed
  first = corpus.items[0]
  assert first.id == ("COCO_val2014_000000000000" if coco else "1000")
  assert corpus.media_path(first).read_bytes() == b"\x00"  # symlink to the source image
  assert load_corpus(tmp_path / "out").item_ids == corpus.item_ids


def test_karpathy_bad_files(tmp_path):
  path, root, images = _karpathy(tmp_path)
  os.remove(root / "1002.jpg")
  with pytest.raises(CorpusFormatError, match=r"images\[2\] \('1002.jpg'\): media of item '1002' "
                                              "missing on disk"):
    import_corpus("karpathy", [path], tmp_path / "out", media_root=root)
  corpus, result = import_corpus("karpathy", [path], tmp_path / "out", media_root=root,
                                 skip_missing_media=True)
  assert result.skipped_items == ["1002"] and len(corpus.items) == 3
  assert corpus.counts()["val"]["query"] == 0
  images[1]["sentences"][1]["raw"] = "  "
  path.write_text(json.dumps({"images": images}))
  with pytest.raises(CorpusFormatError, match=r"images\[1\] \('1001.jpg'\) sentences\[1\]: empty caption"):
    import_corpus("karpathy", [path], tmp_path / "out2", media_root=root)
  images[1]["sentences"][1]["raw"] = "ok"
  images[0]["split"] = "dev"
  path.write_text(json.dumps({"images": images}))
  with pytest.raises(CorpusFormatError, match=r"images\[0\] \('1000.jpg'\): unknown split 'dev'"):
    import_corpus("karpathy", [path], tmp_path / "out2", media_root=root)
  del images[0]["filename"]
  path.write_text(json.dumps({"images": images}))
  with pytest.raises(CorpusFormatError, match=r"images\[0\]: missing field 'filename'"):
    import_corpus("karpathy", [path], tmp_path / "out2", media_root=root)
  assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------------- clotho


def _clotho(tmp_path):
  d = tmp_path / "clotho"
  header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
  for split, names in [("development", ["Santa Motor.wav", "b.wav"]),
                       ("validation", ["c.wav"]), ("evaluation", ["d.wav"])]:
    rows = [[n] + [f"{n} sound, take {k}" for k in range(5)] for n in names]
    _csv(d / f"clotho_captions_{split}.csv", header, rows)
    for n in names:
      _touch(d / "audio" / split / n)
  return d


def test_clotho(tmp_path):
  d = _clotho(tmp_path)
  corpus, _ = import_corpus("clotho", [d], tmp_path / "out", media_root=d / "audio",
                            media_mode="copy")
  assert corpus.modality == "audio" and corpus.item_ids == ["Santa Motor.wav", "b.wav", "c.wav",
                                                            "d.wav"]
  assert corpus.counts()["train"]["query"] == 10 and corpus.counts()["val"]["query"] == 5
  assert corpus.counts()["test"]["query"] == 5
  assert corpus.texts(split="train")[0].text == "Santa Motor.wav sound, take 0"  # quoted comma
  assert corpus.items[0].media == "media/Santa_Motor.wav"
  assert not os.path.islink(corpus.media_path(corpus.items[0]))


def test_clotho_bad_files(tmp_path):
  d = _clotho(tmp_path)
  _csv(d / "clotho_captions_validation.csv", ["file_name", "caption_1", "caption_2"], [["c.wav", "x", "y"]])
  with pytest.raises(CorpusFormatError, match=r"clotho_captions_validation.csv:1: missing column\(s\) "
                                              r"\['caption_3', 'caption_4', 'caption_5'\]"):
    import_corpus("clotho", [d], tmp_path / "out", media_root=d / "audio")
  header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
  _csv(d / "clotho_captions_validation.csv", header,
       [["c.wav", "a", "b", "c", "d", "e"], ["e.wav", "a", "", "c", "d", "e"]])
  _touch(d / "audio" / "validation" / "e.wav")
  with pytest.raises(CorpusFormatError, match=r"clotho_captions_validation.csv:3 \(caption_2\): "
                                              "empty caption for item 'e.wav'"):
    import_corpus("clotho", [d], tmp_path / "out", media_root=d / "audio")


# ------------------------------------------------------------------------------ audiocaps


def _audiocaps(tmp_path):
  d = tmp_path / "audiocaps"
  header = ["audiocap_id", "youtube_id", "start_time", "caption"]
  _csv(d / "train.csv", header, [[91139, "r1nicOVtvkQ", 130, "A woman talks nearby as water pours"],
                                 [58146, "UDGBjjwyaqE", 20, "Multiple clanging and clanking sounds"]])
  _csv(d / "val.csv", header, [[97151, "vfY_TJq7n_U", 130, "Rustling occurs, ducks quack"],
                               [97152, "vfY_TJq7n_U", 130, "Ducks quack and water splashes"]])
  _csv(d / "test.csv", header, [[103549, "--0w1YA1Hm4", 30, "A vehicle driving as a man speaks"]])
  for yid, st in [("r1nicOVtvkQ", 130), ("UDGBjjwyaqE", 20), ("vfY_TJq7n_U", 130), ("--0w1YA1Hm4", 30)]:
    _touch(d / "wav" / f"{yid}_{st}.wav")
  return d


def test_audiocaps(tmp_path):
  d = _audiocaps(tmp_path)
  corpus, _ = import_corpus("audiocaps", [d], tmp_path / "out", media_root=d / "wav")
  assert corpus.item_ids == ["r1nicOVtvkQ_130", "UDGBjjwyaqE_20", "vfY_TJq7n_U_130", "--0w1YA1Hm4_30"]
  assert corpus.counts()["val"]["query"] == 2 and corpus.counts()["test"]["query"] == 1
  assert [t.item_id for t in corpus.texts(split="val")] == ["vfY_TJq7n_U_130"] * 2
  # --media-pattern by audiocap_id: for a clip with several rows the first existing file wins.
  for aid in (91139, 58146, 97152, 103549):
    _touch(d / "by_id" / f"{aid}.wav")
  corpus, _ = import_corpus("audiocaps", [d / "train.csv", d / "val.csv", d / "test.csv"],
                            tmp_path / "out2", media_root=d / "by_id",
                            media_pattern="{audiocap_id}.wav")
  assert os.readlink(corpus.media_path("vfY_TJq7n_U_130")).endswith("97152.wav")
  with pytest.raises(CorpusFormatError, match="unknown placeholder 'vid'"):
    import_corpus("audiocaps", [d], tmp_path / "out3", media_root=d / "wav", media_pattern="{vid}.wav")


def test_audiocaps_bad_files(tmp_path):
  d = _audiocaps(tmp_path)
  os.remove(d / "wav" / "UDGBjjwyaqE_20.wav")
  with pytest.raises(CorpusFormatError, match=r"train.csv:3: media of item 'UDGBjjwyaqE_20' missing"):
    import_corpus("audiocaps", [d], tmp_path / "out", media_root=d / "wav")
  _csv(d / "test.csv", ["audiocap_id", "youtube_id", "caption"], [[1, "x", "y"]])
  with pytest.raises(CorpusFormatError, match=r"test.csv:1: missing column\(s\) \['start_time'\]"):
    import_corpus("audiocaps", [d / "test.csv"], tmp_path / "out", media_root=d / "wav")


# --------------------------------------------------------------------------------- msrvtt


def _msrvtt(tmp_path):
  d = tmp_path / "msrvtt"
  d.mkdir()
  videos = [{"category": 9, "url": "https://www.youtube.com/watch?v=9lZi22qLlEo", "video_id": f"video{i}",
             "start time": 137.72, "end time": 149.44, "split": s, "id": i}
            for i, s in enumerate(["train", "train", "validate", "test"])]
  sentences = [{"caption": f"a person is doing thing {k} in video {i}", "video_id": f"video{i}",
                "sen_id": 2 * i + k} for i in range(4) for k in range(2)]
  tv = d / "train_val_videodatainfo.json"
  tv.write_text(json.dumps({"info": {}, "videos": videos[:3], "sentences": sentences[:6]}))
  te = d / "test_videodatainfo.json"
  te.write_text(json.dumps({"info": {}, "videos": videos[3:], "sentences": sentences[6:]}))
  for i in range(4):
    _touch(d / "videos" / f"video{i}.mp4")
  return d, tv, te, sentences


def test_msrvtt(tmp_path):
  d, tv, te, _ = _msrvtt(tmp_path)
  corpus, _ = import_corpus("msrvtt", [tv, te], tmp_path / "out", media_root=d / "videos")
  assert corpus.modality == "video" and corpus.item_ids == [f"video{i}" for i in range(4)]
  assert corpus.counts() == {"train": {"query": 4, "caption": 0}, "val": {"query": 2, "caption": 0},
                             "test": {"query": 2, "caption": 0}}


def test_msrvtt_unknown_video_cli_leaves_nothing(tmp_path, capsys):
  from cart_jax.core.errors import CartError
  d, tv, te, sentences = _msrvtt(tmp_path)
  data = json.loads(te.read_text())
  data["sentences"].append({"caption": "orphan", "video_id": "video99", "sen_id": 99})
  te.write_text(json.dumps(data))
  out = tmp_path / "out"
  with pytest.raises(CartError, match=r"test_videodatainfo.json: sentences\[2\]: unknown item id 'video99'"):
    _cli(["import", "msrvtt", str(tv), str(te), "--media-root", str(d / "videos"), "--out", str(out)])
  assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["msrvtt"]
  # and through the real console entry point: exit code 2, message on stderr
  from cart_jax.cli import main as cli
  saved = list(cli.COMMANDS)
  try:
    cli.COMMANDS[:] = [("data", "data", "corpora")]
    rc = cli.main(["data", "import", "msrvtt", str(tv), str(te), "--media-root",
                   str(d / "videos"), "--out", str(out)])
  finally:
    cli.COMMANDS[:] = saved
  assert rc == 2 and "unknown item id 'video99'" in capsys.readouterr().err
  assert not out.exists()


# ----------------------------------------------------------------------------------- msvd


def _msvd(tmp_path, n=5):
  d = tmp_path / "msvd"
  d.mkdir()
  clips = [f"-4wsuPCjDBc_{5 + i}_{15 + i}" for i in range(n)]
  lines = ["# Microsoft Research Video Description Corpus", "# video_id caption"]
  lines += [f"{c} a squirrel is eating nut {k}" for c in clips for k in range(2)]
  (d / "AllVideoDescriptions.txt").write_text("\n".join(lines) + "\n")
  (d / "youtube_mapping.txt").write_text("".join(f"{c} vid{i + 1}\n" for i, c in enumerate(clips)))
  for c in clips:
    _touch(d / "YouTubeClips" / f"{c}.avi")
  return d, clips


def test_msvd_split_lists_and_mapping(tmp_path):
  d, clips = _msvd(tmp_path)
  (d / "train.txt").write_text("vid1\nvid2\nvid3\n")
  (d / "val.txt").write_text(f"{clips[3]}\n")
  (d / "test.txt").write_text("vid5\n")
  rc = _cli(["import", "msvd", str(d / "AllVideoDescriptions.txt"), "--media-root",
             str(d / "YouTubeClips"), "--mapping", str(d / "youtube_mapping.txt"),
             "--split-list", f"train={d / 'train.txt'}", "--split-list", f"val={d / 'val.txt'}",
             "--split-list", f"test={d / 'test.txt'}", "--out", str(tmp_path / "out")])
  assert rc == 0
  corpus = load_corpus(tmp_path / "out")
  assert corpus.item_ids == clips
  assert corpus.counts()["train"]["query"] == 6 and corpus.counts()["val"]["query"] == 2
  assert [t.item_id for t in corpus.texts(split="test")] == [clips[4]] * 2
  assert corpus.texts(split="val")[0].text == "a squirrel is eating nut 0"


def test_msvd_standard_split_and_csv(tmp_path):
  d, clips = _msvd(tmp_path, n=3)
  rows = [["-4wsuPCjDBc", 5 + i, 15 + i, 1, "clean", 10, lang, f"desc {i} {lang}"]
          for i in range(3) for lang in ("English", "German")]
  _csv(d / "MSR Video Description Corpus.csv",
       ["VideoID", "Start", "End", "WorkerID", "Source", "AnnotationTime", "Language", "Description"],
       rows)
  corpus, _ = import_corpus("msvd", [d / "MSR Video Description Corpus.csv"], tmp_path / "out",
                            media_root=d / "YouTubeClips", mapping=d / "youtube_mapping.txt")
  # vid1..vid1200 -> train under the standard split
  assert corpus.counts()["train"]["query"] == 3 and len(corpus.all_texts) == 3
  assert {t.text for t in corpus.all_texts} == {"desc 0 English", "desc 1 English", "desc 2 English"}


def test_msvd_bad_files(tmp_path):
  d, clips = _msvd(tmp_path)
  with pytest.raises(CorpusFormatError, match="msvd needs its splits"):
    import_corpus("msvd", [d / "AllVideoDescriptions.txt"], tmp_path / "out",
                  media_root=d / "YouTubeClips")
  (d / "train.txt").write_text("\n".join(clips[:4]) + "\n")
  with pytest.raises(CorpusFormatError, match=r"AllVideoDescriptions.txt:11: video "
                                              f"'{clips[4]}' is in no split"):
    import_corpus("msvd", [d / "AllVideoDescriptions.txt"], tmp_path / "out",
                  media_root=d / "YouTubeClips", split_lists={"train": d / "train.txt"})
  with open(d / "AllVideoDescriptions.txt", "a") as f:
    f.write(f"{clips[0]}\n")
  (d / "train.txt").write_text("\n".join(clips) + "\n")
  with pytest.raises(CorpusFormatError, match=r"AllVideoDescriptions.txt:13: empty caption"):
    import_corpus("msvd", [d / "AllVideoDescriptions.txt"], tmp_path / "out",
                  media_root=d / "YouTubeClips", split_lists={"train": d / "train.txt"})
  (d / "youtube_mapping.txt").write_text("abc\n")
  with pytest.raises(CorpusFormatError, match=r"youtube_mapping.txt:1: expected '<video_id> vid<N>'"):
    import_corpus("msvd", [d / "AllVideoDescriptions.txt"], tmp_path / "out",
                  media_root=d / "YouTubeClips", mapping=d / "youtube_mapping.txt")
  assert not (tmp_path / "out").exists()


def test_unknown_format_and_missing_source(tmp_path):
  with pytest.raises(CorpusFormatError, match="unknown format 'vatex'"):
    import_corpus("vatex", [tmp_path], tmp_path / "out")
  with pytest.raises(CorpusFormatError, match="nope.json: not found"):
    import_corpus("msrvtt", [tmp_path / "nope.json"], tmp_path / "out")
