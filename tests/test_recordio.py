"""RecordIO reader/writer against MXNet-written files and generated data; .bin files; datasets."""

import pickle
import struct

import numpy as np
import pytest

from lafs.data.datasets import ImageFolderDataset, RecordDataset, decode_image, decode_image_chw, encode_image
from lafs.data.pairs import bin_from_csv, bin_from_lfw_pairs, read_bin, write_bin
from lafs.data.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    encode_record,
    face_record_index,
    pack,
    unpack,
    write_face_records,
)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# --- byte format -----------------------------------------------------------------------------------------------

def test_encode_record_by_hand():
    # 5-byte payload: header (magic, flag 0 | length 5), payload, 3 zero bytes of padding.
    assert encode_record(b"abcde") == MAGIC_BYTES + struct.pack("<I", 5) + b"abcde" + b"\0\0\0"


def test_aligned_magic_splits_the_record_and_reads_back(tmp_path):
    payload = b"abcd" + MAGIC_BYTES + b"efghij"
    enc = encode_record(payload)
    # part 1: flag 1, 4 bytes "abcd"; part 2: flag 3, 6 bytes "efghij" + 2 padding; the magic is dropped.
    assert enc == (MAGIC_BYTES + struct.pack("<I", (1 << 29) | 4) + b"abcd"
                   + MAGIC_BYTES + struct.pack("<I", (3 << 29) | 6) + b"efghij\0\0")
    # An unaligned magic is kept inside one part.
    unaligned = b"ab" + MAGIC_BYTES + b"cd"
    assert encode_record(unaligned) == MAGIC_BYTES + struct.pack("<I", 8) + unaligned
    with RecordWriter(tmp_path / "m.rec") as w:
        w.write(0, payload)
        w.write(1, MAGIC_BYTES * 3)
        w.write(2, unaligned)
    r = RecordReader(tmp_path / "m.rec")
    assert [r.read(k) for k in (0, 1, 2)] == [payload, MAGIC_BYTES * 3, unaligned]


def test_pack_unpack_scalar_and_array_labels():
    h, rest = unpack(pack(IRHeader(0, 7.0, 3, 0), b"xyz"))
    assert (h.flag, h.label, h.id, h.id2, rest) == (0, 7.0, 3, 0, b"xyz")
    h, rest = unpack(pack(IRHeader(2, np.array([5, 9]), 0, 0), b"img"))
    assert h.flag == 2 and h.label.tolist() == [5.0, 9.0] and rest == b"img"


def test_generated_face_records_round_trip(tmp_path):
    samples = [(0, _jpeg(1)), (0, _jpeg(2)), (1, _jpeg(3)), (2, _jpeg(4)), (2, _jpeg(5)), (2, _jpeg(6))]
    assert write_face_records(tmp_path / "t.rec", samples) == (6, 3)
    r = RecordReader(tmp_path / "t.rec")
    keys, labels = face_record_index(r)
    assert keys == [1, 2, 3, 4, 5, 6] and labels.tolist() == [0, 0, 1, 2, 2, 2]
    header, _ = r.read_header(0)
    assert header.label.tolist() == [7.0, 10.0]
    assert r.read_header(9)[0].label.tolist() == [4.0, 7.0]  # identity 2's [start, end)
    assert [r.read_header(k)[1] for k in keys] == [b for _, b in samples]
    ds = RecordDataset(tmp_path / "t.rec")
    assert ds.images_per_identity().tolist() == [2, 1, 3]
    assert ds[3]["image"].shape == (3, 32, 32) and ds[3]["label"] == 2


def test_writer_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordWriter(tmp_path / "x.rec") as w:
            w.write(0, b"data")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="ascending"):
        write_face_records(tmp_path / "y.rec", [(1, b"a"), (0, b"b")])
    assert list(tmp_path.iterdir()) == []


# --- corrupt files -----------------------------------------------------------------------------------------------

def _small_rec(tmp_path):
    write_face_records(tmp_path / "c.rec", [(0, _jpeg(1)), (1, _jpeg(2)), (1, _jpeg(3))])
    return tmp_path / "c.rec", tmp_path / "c.idx"


def test_wrong_magic_is_reported_with_key_and_offset(tmp_path):
    rec, idx = _small_rec(tmp_path)
    r = RecordReader(rec)
    off = r.idx[2]
    data = bytearray(rec.read_bytes())
    data[off : off + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"c\.rec: record 2 at byte {off}: bad magic"):
        RecordReader(rec).read(2)


def test_truncated_record_and_idx_past_end(tmp_path):
    rec, idx = _small_rec(tmp_path)
    r = RecordReader(rec)
    off = r.idx[3]
    rec.write_bytes(rec.read_bytes()[: off + 20])
    # Keep only index lines that still point inside the file, so the reader opens and hits the cut record.
    idx.write_text("".join(line + "\n" for line in idx.read_text().splitlines() if int(line.split()[1]) < off + 20))
    with pytest.raises(RecordIOError, match=rf"record 3 at byte {off} truncated"):
        RecordReader(rec).read(3)
    idx.write_text(idx.read_text() + "99\t123456789\n")
    with pytest.raises(RecordIOError, match=r"c\.idx: record 99 points to byte 123456789, past the end"):
        RecordReader(rec)
    idx.write_text("0\tzero\n")
    with pytest.raises(RecordIOError, match=r"c\.idx:1"):
        RecordReader(rec)


def test_undecodable_image_and_bad_record_budget(tmp_path):
    write_face_records(tmp_path / "b.rec", [(0, _jpeg(1)), (0, b"not a jpeg"), (1, _jpeg(2))])
    ds = RecordDataset(tmp_path / "b.rec")
    with pytest.raises(RuntimeError, match=r"record 2 at byte \d+: cannot decode"):
        ds[1]
    tolerant = RecordDataset(tmp_path / "b.rec", max_bad_records=1)
    item = tolerant[1]
    assert item["index"] == 2 and len(tolerant.bad_records) == 1 and len(item["bad_records"]) == 1
    again = tolerant[1]  # the same record in the next epoch: skipped, not counted twice
    assert again["index"] == 2 and len(tolerant.bad_records) == 1 and "bad_records" not in again
    write_face_records(tmp_path / "c.rec", [(0, _jpeg(1)), (0, b"not a jpeg"), (1, b"nor this"), (1, _jpeg(2))])
    with pytest.raises(RuntimeError, match="more than max_bad_records=1"):
        RecordDataset(tmp_path / "c.rec", max_bad_records=1)[1]  # two distinct bad records


def test_reader_is_fork_safe_by_reopening(tmp_path):
    rec, _ = _small_rec(tmp_path)
    r = RecordReader(rec)
    r.read(1)
    clone = pickle.loads(pickle.dumps(r))  # what a spawned DataLoader worker receives
    assert clone._fh is None and clone.read(2) == r.read(2)


def _reference_item_image(data: bytes, color: str) -> np.ndarray:
    """The data path before decode_image_chw: decode_image (BGR->RGB by cv2.cvtColor), then a CHW copy."""
    return np.ascontiguousarray(decode_image(data, color).transpose(2, 0, 1))


@pytest.mark.parametrize("color", ["rgb", "bgr"])
def test_chw_decode_and_dataset_items_are_unchanged(tmp_path, color):
    rng = np.random.default_rng(0)
    blobs = [encode_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (17, 29), (64, 48))]
    blobs.append(encode_image(np.full((9, 9, 3), 77, np.uint8)))
    for data in blobs:
        got = decode_image_chw(data, color)
        assert got.flags.c_contiguous and got.dtype == np.uint8
        np.testing.assert_array_equal(got, _reference_item_image(data, color))
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image_chw(b"not a jpeg")
    write_face_records(tmp_path / "s.rec", [(0, blobs[0]), (0, blobs[1]), (1, blobs[2])])
    ds = RecordDataset(tmp_path / "s.rec", color=color)
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert image.is_contiguous()
        np.testing.assert_array_equal(image.numpy(), _reference_item_image(blobs[i], color))


# --- MXNet-written files in ../shared/data -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lfw_train", "celeba200"])
def test_mxnet_written_rec_reads_exactly_and_rewrites_byte_identical(shared_data, tmp_path, name):
    import json

    rec = shared_data / "train" / f"{name}.rec"
    meta = json.loads((shared_data / "train" / "meta.json").read_text())[name]
    r = RecordReader(rec)
    keys, labels = face_record_index(r)
    assert len(keys) == meta["images"] and labels.max() + 1 == meta["identities"]
    assert keys == list(range(1, meta["images"] + 1))
    for k in (keys[0], keys[len(keys) // 2], keys[-1]):
        h, img = r.read_header(k)
        assert h.flag == 0 and h.id == k and h.id2 == 0 and img[:2] == b"\xff\xd8"
    # Identity records hold [start, end) ranges consistent with the labels.
    h, _ = r.read_header(meta["images"] + 1)
    assert h.label.tolist() == [1.0, 1.0 + np.sum(labels == 0)]
    # Our writer reproduces MXNet's files byte for byte.
    out = tmp_path / f"{name}.rec"
    write_face_records(out, [(int(lab), r.read_header(k)[1]) for k, lab in zip(keys, labels)])
    assert out.read_bytes() == rec.read_bytes()
    assert out.with_suffix(".idx").read_text() == rec.with_suffix(".idx").read_text()


def test_shared_rec_dataset_colours_and_keypoints(shared_data):
    ds = RecordDataset(shared_data / "train" / "celeba200.rec")
    assert ds.keypoints is not None and ds.keypoints.shape == (len(ds), 5, 2)
    imgs = np.stack([ds[i]["image"].numpy() for i in range(0, len(ds), 97)]).astype(np.float64)
    # Faces are red-dominant: decoded as RGB, the red channel's mean exceeds the blue one's.
    assert imgs[:, 0].mean() > imgs[:, 2].mean() + 5
    swapped = RecordDataset(shared_data / "train" / "celeba200.rec", color="bgr")
    np.testing.assert_array_equal(swapped[0]["image"].numpy(), ds[0]["image"].numpy()[::-1])
    # Keypoints of aligned faces lie near the ArcFace template.
    assert np.abs(ds.keypoints.mean(0) - np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4],
                                                   [70.7, 92.2]])).max() < 6


@pytest.mark.parametrize("name", ["celeba64_train", "celeba200"])
def test_shared_rec_items_unchanged_by_the_one_pass_decode(shared_data, name):
    ds = RecordDataset(shared_data / "train" / f"{name}.rec")
    for i in np.linspace(0, len(ds) - 1, 40).astype(int):
        np.testing.assert_array_equal(ds[int(i)]["image"].numpy(), _reference_item_image(ds.raw(int(i)), "rgb"))


def test_shared_lfw_bin_reads(shared_data, tmp_path):
    images, issame = read_bin(shared_data / "lfw" / "lfw.bin")
    assert len(images) == 12000 and issame.shape == (6000,) and issame.sum() == 3000
    assert decode_image(images[0]).shape == (112, 112, 3)
    out = write_bin(tmp_path / "copy.bin", images[:20], issame[:10])
    again, same = read_bin(out)
    assert again == images[:20] and same.tolist() == issame[:10].tolist()


# --- .bin and image folders ----------------------------------------------------------------------------------------

def test_bin_round_trip_and_numpy_buffers(tmp_path):
    imgs = [_jpeg(i) for i in range(4)]
    write_bin(tmp_path / "a.bin", imgs, [True, False])
    got, same = read_bin(tmp_path / "a.bin")
    assert got == imgs and same.tolist() == [True, False]
    with open(tmp_path / "np.bin", "wb") as fh:
        pickle.dump(([np.frombuffer(b, np.uint8) for b in imgs], [False, True]), fh)
    got, same = read_bin(tmp_path / "np.bin")
    assert got == imgs and same.tolist() == [False, True]
    with pytest.raises(ValueError, match="3 images for 2 pairs"):
        write_bin(tmp_path / "bad.bin", imgs[:3], [True, False])
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.bin"):
        read_bin(tmp_path / "junk.bin")


def _folder(tmp_path):
    for name, n in (("alice", 2), ("bob", 3)):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for i in range(1, n + 1):
            (tmp_path / "faces" / name / f"{name}_{i:04d}.jpg").write_bytes(_jpeg(hash((name, i)) % 1000))
    return tmp_path / "faces"


def test_bin_from_lfw_pairs_and_csv(tmp_path):
    root = _folder(tmp_path)
    (tmp_path / "pairs.txt").write_text("1 2\nbob 1 3\nalice 2\tbob 2\n")
    images, issame = read_bin(bin_from_lfw_pairs(tmp_path / "pairs.txt", root, tmp_path / "p.bin"))
    assert issame.tolist() == [True, False]
    assert images[0] == (root / "bob" / "bob_0001.jpg").read_bytes()
    assert images[3] == (root / "bob" / "bob_0002.jpg").read_bytes()
    (tmp_path / "pairs.csv").write_text("path1,path2,issame\nalice/alice_0001.jpg,alice/alice_0002.jpg,1\n")
    _, issame = read_bin(bin_from_csv(tmp_path / "pairs.csv", root, tmp_path / "c.bin"))
    assert issame.tolist() == [True]
    (tmp_path / "bad.txt").write_text("carol 1 2\n")
    with pytest.raises(FileNotFoundError, match="carol_0001.jpg"):
        bin_from_lfw_pairs(tmp_path / "bad.txt", root, tmp_path / "x.bin")


def test_image_folder_dataset(tmp_path):
    ds = ImageFolderDataset(_folder(tmp_path))
    assert ds.identities == ["alice", "bob"] and ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert ds[4]["label"] == 1 and ds[4]["image"].dtype.is_floating_point is False
    np.testing.assert_array_equal(ds[3]["image"].numpy(), _reference_item_image(ds.raw(3), "rgb"))
    assert {k: v.tolist() for k, v in ds.identity_index().items()} == {0: [0, 1], 1: [2, 3, 4]}


def test_label_mismatch_between_record_and_index_is_named(tmp_path):
    rec, _ = _small_rec(tmp_path)
    ds = RecordDataset(rec)
    ds.labels[1] = 0  # the index now disagrees with record 2's header (identity 1)
    with pytest.raises(RuntimeError, match=r"record 2 at byte \d+: label 1 differs from the index \(0\)"):
        ds[1]


def test_read_label_from_record_heads_including_split_headers(tmp_path):
    with RecordWriter(tmp_path / "h.rec") as w:
        w.write(1, pack(IRHeader(0, 3.0, 1, 0), b"img"))
        # id = MAGIC puts the magic word at payload offset 8 (aligned): the record splits inside its header.
        w.write(2, pack(IRHeader(0, 5.0, MAGIC, 0), b"img"))
        w.write(3, pack(IRHeader(2, np.array([7, 9]), 3, 0), b""))
    r = RecordReader(tmp_path / "h.rec")
    assert [r.read_label(k) for k in (1, 2, 3)] == [3, 5, 7]
    assert r.read_header(2)[0].id == MAGIC


def test_concat_face_datasets_offset_labels_and_positions():
    import numpy as np

    from lafs.data.datasets import ArrayFaceDataset, ConcatFaceDataset

    imgs = np.zeros((5, 4, 4, 3), np.uint8)
    imgs[:, 0, 0, 0] = np.arange(5)
    a = ArrayFaceDataset(imgs[:3], [0, 1, 1], name="a")
    b = ArrayFaceDataset(imgs[3:], [0, 2], name="b")
    both = ConcatFaceDataset([a, b])
    assert len(both) == 5 and both.num_identities == 2 + 3
    assert both.labels.tolist() == [0, 1, 1, 2, 4]
    item = both[4]
    assert item["label"] == 4 and item["index"] == 4 and item["image"][0, 0, 0] == 4
    with pytest.raises(ValueError, match="b2: 2 images but 1 labels"):
        ArrayFaceDataset(imgs[:2], [0], name="b2")
