"""Readers on small hand-written sources (written into tmp folders), title cleaning, bad input."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from data_prep.errors import DataPrepError
from data_prep.readers import (TableColumns, clean_title, k_core, read_amazon2018, read_games,
                               read_table)

# ----------------------------------------------------------------------------- titles


@pytest.mark.parametrize("raw, clean", [
    ("Phantasy Star Online, Episode I &amp; II", "Phantasy Star Online, Episode I & II"),
    ("Marvel&rsquo;s Spider-Man", "Marvel\u2019s Spider-Man"),
    ("  Mario \t  Kart\n 8 ", "Mario Kart 8"),
    ("&amp;amp;", "&amp;"),  # unescaped once, like html.unescape
    (None, ""),
    (float("nan"), ""),
])
def test_clean_title(raw, clean):
    assert clean_title(raw) == clean


# ----------------------------------------------------------------------------- games


def write_games(folder, items=None, test=None, valid=None):
    items = items if items is not None else [
        "0\tFire Emblem &amp; Friends", "1\t  Mario   Kart ", "2\tZelda", "3\tZelda", "4\tMetroid"]
    test = test if test is not None else ["0\t0 1 2\t3", "1\t4 2 1\t0"]
    (folder / "G.item").write_text("item_id:token\ttitle:token_seq\n" + "\n".join(items) + "\n")
    (folder / "G.test.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n"
                                         + "\n".join(test) + "\n")
    if valid is not None:
        (folder / "G.valid.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n"
                                              + "\n".join(valid) + "\n")
    return folder


def test_games_reader_sequences_titles_and_duplicates(tmp_path):
    data = read_games(write_games(tmp_path, valid=["0\t0 1\t2", "1\t4 2\t1"]))
    assert data.sequences == {0: [0, 1, 2, 3], 1: [4, 2, 1, 0]}
    assert data.items["item_id"].tolist() == [0, 1, 2, 3, 4]
    assert data.items["title"].tolist() == ["Fire Emblem & Friends", "Mario Kart", "Zelda", "Zelda", "Metroid"]


def test_games_valid_file_must_agree(tmp_path):
    write_games(tmp_path, valid=["0\t0 1\t2", "1\t4 1\t2"])  # user 1's valid sequence is not a suffix
    with pytest.raises(DataPrepError, match=r"G\.valid\.inter.*user 1"):
        read_games(tmp_path)


def test_games_capped_valid_suffix_is_accepted(tmp_path):
    # upstream capped histories: the valid file may hold only the end of the test history
    write_games(tmp_path, valid=["0\t1\t2", "1\t4 2\t1"])
    assert read_games(tmp_path).sequences[0] == [0, 1, 2, 3]


def test_games_unknown_item_and_bad_files(tmp_path):
    write_games(tmp_path, test=["0\t0 1 7\t3"])
    with pytest.raises(DataPrepError, match=r"missing from G\.item"):
        read_games(tmp_path)
    write_games(tmp_path, test=["0\t0 x 2\t3"])
    with pytest.raises(DataPrepError, match=r"G\.test\.inter, line 2: item ids must be integers"):
        read_games(tmp_path)
    write_games(tmp_path, test=["0\t0 1 2"])
    with pytest.raises(DataPrepError, match="expected 3 tab-separated fields"):
        read_games(tmp_path)
    (tmp_path / "G.item").write_text("")
    with pytest.raises(DataPrepError, match=r"G\.item is empty"):
        read_games(tmp_path)
    (tmp_path / "G.item").write_text("id\tname\n0\tx\n")
    with pytest.raises(DataPrepError, match="header"):
        read_games(tmp_path)


def test_games_folder_errors(tmp_path):
    with pytest.raises(DataPrepError, match="data.path is empty"):
        read_games("")
    with pytest.raises(DataPrepError, match="not a folder"):
        read_games(tmp_path / "nope")
    with pytest.raises(DataPrepError, match=r"Missing file: no \*\.item file"):
        read_games(tmp_path)
    write_games(tmp_path)
    (tmp_path / "H.item").write_text("item_id:token\ttitle:token_seq\n")
    with pytest.raises(DataPrepError, match=r"Several files could be the \*\.item file.*G\.item, H\.item; keep one"):
        read_games(tmp_path)


# ----------------------------------------------------------------------------- amazon 2018


def write_amazon(folder, ratings: list[str], meta: list[str]):
    (folder / "Video_Games.csv").write_text("\n".join(ratings) + "\n")
    with gzip.open(folder / "meta_Video_Games.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(meta) + "\n")
    return folder


def amazon_fixture(folder):
    """u1..u6 rate A-E (5-core survivors). F: only u1 (fails the item core). u7 rates A-D + G,
    G has one rating: G goes in the first pass, then u7 (4 left) in the second. H has no title.
    u3 rates A twice. File order is not time order."""
    ratings = []
    t = 1000
    for u in ["u1", "u2", "u3", "u4", "u5", "u6"]:
        for i in reversed("ABCDE"):  # written newest first
            ratings.append(f"{i},{u},5.0,{t + 'ABCDE'.index(i) * 10 + int(u[1])}")
    ratings += ["F,u1,3.0,2000", "G,u7,4.0,1500", "H,u2,4.0,1200", "A,u3,1.0,9999"]
    ratings += [f"{i},u7,4.0,{1100 + k}" for k, i in enumerate("ABCD")]
    meta = [json.dumps({"asin": "A", "title": "Alpha &amp; Omega"}),
            "{'asin': 'B', 'title': 'Beta   Game', 'price': '$5'}",  # python literal, as in 2018
            json.dumps({"asin": "C", "title": "Gamma"}), json.dumps({"asin": "D", "title": "Delta"}),
            json.dumps({"asin": "E", "title": "Gamma"}),  # duplicate title, distinct item
            json.dumps({"asin": "F", "title": "Foxtrot"}), json.dumps({"asin": "G", "title": "Golf"}),
            json.dumps({"asin": "H", "title": "   "})]  # empty after cleaning = no title
    return write_amazon(folder, ratings, meta)


def test_amazon2018_pipeline(tmp_path):
    data = read_amazon2018(amazon_fixture(tmp_path))
    # u1's rows come first in the file -> user 0; sorted by time its items are A,B,C,D,E
    assert data.items["title"].tolist() == ["Alpha & Omega", "Beta Game", "Gamma", "Delta", "Gamma"]
    assert len(data.sequences) == 6
    assert all(seq == [0, 1, 2, 3, 4] for seq in data.sequences.values())
    assert data.dropped["repeated_user_item"] == 1
    assert data.dropped["interactions_without_title"] == 1
    assert data.dropped["interactions_below_5_core"] == 1 + 5  # F, then u7's 4 + G
    assert data.dropped["titled_items_without_interactions"] == 2  # F and G (H has no title)


def test_amazon2018_original_ids_and_k_core_option(tmp_path):
    data = read_amazon2018(amazon_fixture(tmp_path), k=0)  # no core: u7 stays, with G; F too
    assert sorted(data.original_users.values()) == [f"u{i}" for i in range(1, 8)]
    assert set(data.original_items.values()) == set("ABCDEFG")
    assert "interactions_below_0_core" not in data.dropped
    seq_u7 = next(s for u, s in data.sequences.items() if data.original_users[u] == "u7")
    assert [data.original_items[i] for i in seq_u7] == list("ABCDG")  # by time: 1100..1103, then 1500


def test_amazon2018_errors_are_separate(tmp_path):
    with pytest.raises(DataPrepError, match="Missing file: no ratings CSV"):
        read_amazon2018(tmp_path)
    ratings = [f"{i},u{u},5.0,{100 + k}" for u in range(3) for k, i in enumerate("ABC")]
    meta = [json.dumps({"asin": i, "title": i}) for i in "ABC"]
    write_amazon(tmp_path, ["item,user,rating,timestamp"] + ratings, meta)
    with pytest.raises(DataPrepError, match="Wrong columns: .*line 1 looks like a header"):
        read_amazon2018(tmp_path)
    write_amazon(tmp_path, [r.rsplit(",", 1)[0] for r in ratings], meta)
    with pytest.raises(DataPrepError, match="Wrong columns: .*3 fields per row, expected 4"):
        read_amazon2018(tmp_path)
    write_amazon(tmp_path, ratings, [json.dumps({"asin": "Z", "title": "z"})])
    with pytest.raises(DataPrepError, match="None of the 3 rated items .* has a title .*same category"):
        read_amazon2018(tmp_path)
    write_amazon(tmp_path, ratings, meta)
    with pytest.raises(DataPrepError, match=r"Nothing left after 5-core filtering.*Lower data.k-core"):
        read_amazon2018(tmp_path)
    assert len(read_amazon2018(tmp_path, k=3).sequences) == 3


def test_k_core_is_iterative():
    df = pd.DataFrame({"user": ["a"] * 2 + ["b"] * 2 + ["c"], "item": ["x", "y", "x", "y", "x"]})
    out = k_core(df, 2)
    assert sorted(out["user"].unique()) == ["a", "b"]  # c has one row; x and y keep 2 each


def test_amazon2018_bad_lines(tmp_path):
    write_amazon(tmp_path, ["A,u1,5.0,100"], ['{"asin": "A", "title": "x"}', "{not valid"])
    with pytest.raises(DataPrepError, match=r"meta_Video_Games\.json\.gz, line 2: neither JSON"):
        read_amazon2018(tmp_path)
    write_amazon(tmp_path, ["A,u1,5.0,100", "A,u2,5.0,yesterday"], ['{"asin": "A", "title": "x"}'])
    with pytest.raises(DataPrepError, match=r"Video_Games\.csv, line 2: the 4th column"):
        read_amazon2018(tmp_path)
    write_amazon(tmp_path, ["A,u1,5.0,100"], ['{"title": "x"}'])
    with pytest.raises(DataPrepError, match="no 'asin' field"):
        read_amazon2018(tmp_path)
    (tmp_path / "Video_Games.csv").write_text("")
    write_amazon(tmp_path, [""], ['{"asin": "A", "title": "x"}'])
    with pytest.raises(DataPrepError, match="empty"):
        read_amazon2018(tmp_path)


# ----------------------------------------------------------------------------- generic table


def test_table_reader_custom_columns_time_order_and_drops(tmp_path):
    inter = pd.DataFrame({
        "uid": ["bob", "ann", "bob", "ann", "bob", "ann", "ann"],
        "sku": ["k2", "k1", "k1", "k3", "k9", "k1", "k2"],
        "when": ["2020-01-03", "2020-01-02", "2020-01-01", "2020-01-01", "2020-01-05", "2020-01-09",
                 "2020-01-04"],
    })
    inter.to_csv(tmp_path / "interactions.csv", index=False)
    pd.DataFrame({"sku": ["k1", "k2", "k3", "k4"],
                  "name": ["One", "Two &amp; Co", "Three", "Unused"]}).to_parquet(tmp_path / "items.parquet")
    data = read_table(tmp_path, TableColumns(user="uid", item="sku", timestamp="when", title="name"))
    # users and items are numbered by their own ids, not by the file: ann (second in the file) -> user 0
    # ann: k3 (01-01), k1 (01-02), k2 (01-04); the repeat of k1 on 01-09 is dropped
    # bob: k1 (01-01), k2 (01-03); k9 has no title
    titles = dict(zip(data.items["item_id"], data.items["title"]))
    named = {u: [titles[i] for i in s] for u, s in data.sequences.items()}
    assert named == {0: ["Three", "One", "Two & Co"], 1: ["One", "Two & Co"]}
    assert data.original_users == {0: "ann", 1: "bob"} and data.original_items == {0: "k1", 1: "k2", 2: "k3"}
    assert data.dropped == {"repeated_user_item": 1, "interactions_without_title": 1,
                            "titled_items_without_interactions": 1}
    assert len(data.items) == 3  # "Unused" is not in the catalogue


def test_table_file_order_only_when_asked(tmp_path):
    pd.DataFrame({"user_id": [1, 1, 1], "item_id": [30, 10, 20]}).to_csv(tmp_path / "interactions.csv", index=False)
    pd.DataFrame({"item_id": [10, 20, 30], "title": ["a", "b", "c"]}).to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(DataPrepError) as err:
        read_table(tmp_path)  # no silent fallback to the file order
    message = str(err.value)
    assert "no time column 'timestamp' (data.time-col)" in message and "['user_id', 'item_id']" in message
    assert "data.order='file'" in message
    data = read_table(tmp_path, TableColumns(order="file"))
    assert [data.items["title"][i] for i in data.sequences[0]] == ["c", "a", "b"]


def write_table(folder, rows, sep=","):
    inter = pd.DataFrame(rows, columns=["who", "what", "ts"])
    inter.to_csv(folder / "interactions.csv", index=False, sep=sep)
    items = sorted({r[1] for r in rows})
    pd.DataFrame({"what": items, "name": [f"Title {i}" for i in items]}).to_csv(folder / "items.csv", index=False, sep=sep)


COLS = TableColumns(user="who", item="what", timestamp="ts", title="name")


def named_sequences(data):
    return {data.original_users[u]: [data.original_items[i] for i in s] for u, s in data.sequences.items()}


def test_equal_times_are_ordered_by_item_id_whatever_the_file_order(tmp_path):
    # user 7: items 10 and 9 at t=5 (tie), 100 at t=1; user x: "b" and "a" at t=2 (tie, text ids)
    rows = [(7, 10, 5), (7, 9, 5), (7, 100, 1), ("x", 10, 2), ("x", 9, 2), ("x", 100, 3)]
    expected = {"7": ["100", "9", "10"], "x": ["9", "10", "100"]}  # numeric item order: 9 < 10 < 100
    for order in (rows, rows[::-1], [rows[i] for i in (3, 1, 5, 0, 4, 2)]):
        write_table(tmp_path, order)
        assert named_sequences(read_table(tmp_path, COLS)) == expected
    text_items = [(1, "b", 5), (1, "a", 5), (1, "c", 1)]
    write_table(tmp_path, text_items)
    assert named_sequences(read_table(tmp_path, COLS)) == {"1": ["c", "a", "b"]}


def test_table_separator_and_k_core(tmp_path):
    rows = [(u, i, u * 10 + i) for u in range(4) for i in range(4)] + [(9, 0, 1), (9, 1, 2)]
    write_table(tmp_path, rows, sep="\t")
    with pytest.raises(DataPrepError, match=r"missing columns.*data.user-col='who'.*set data.sep"):
        read_table(tmp_path, COLS)
    data = read_table(tmp_path, TableColumns("who", "what", "ts", "name", sep="tab"), k=3)
    assert sorted(data.original_users.values()) == ["0", "1", "2", "3"]  # user 9 has 2 < 3
    assert data.dropped["interactions_below_3_core"] == 2
    with pytest.raises(DataPrepError, match="Nothing left after 5-core filtering"):
        read_table(tmp_path, TableColumns("who", "what", "ts", "name", sep="tab"), k=5)


def test_table_errors(tmp_path):
    pd.DataFrame({"user": [1], "item_id": [1]}).to_csv(tmp_path / "interactions.csv", index=False)
    pd.DataFrame({"item_id": [1], "title": ["a"]}).to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(DataPrepError, match=r"interactions\.csv: missing columns.*data.user-col='user_id' \(CLI --user-col\)"):
        read_table(tmp_path)
    pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}).to_csv(tmp_path / "interactions.csv", index=False)
    with pytest.raises(DataPrepError, match="No item of interactions.csv has a title"):
        read_table(tmp_path)
    (tmp_path / "items.csv").write_text("")
    with pytest.raises(DataPrepError, match=r"items\.csv is empty"):
        read_table(tmp_path)
    pd.DataFrame({"item_id": [1, 1], "title": ["a", "b"]}).to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(DataPrepError, match="item ids repeat"):
        read_table(tmp_path)
    pd.DataFrame({"user_id": [1], "item_id": [1], "timestamp": ["soon"]}).to_csv(
        tmp_path / "interactions.csv", index=False)
    pd.DataFrame({"item_id": [1], "title": ["a"]}).to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(DataPrepError, match=r"column 'timestamp' has missing or unparsable values.*line 2.*--time-col"):
        read_table(tmp_path)


def test_table_file_names_are_settings(tmp_path):
    """data.interactions-file / data.items-file: a file of any name (read with data.sep unless it
    is parquet), or a stem found as <stem>.csv / <stem>.parquet; a missing one names the key."""
    pd.DataFrame({"uid": [1, 1, 1, 2, 2, 2], "movie": [10, 20, 30, 20, 30, 10], "when": [1, 2, 3, 1, 2, 3]}).to_csv(
        tmp_path / "u.data", sep="\t", index=False)
    pd.DataFrame({"movie": [10, 20, 30], "name": ["A", "B", "C"]}).to_parquet(tmp_path / "movies.parquet")
    columns = TableColumns(user="uid", item="movie", timestamp="when", title="name", sep="tab",
                           interactions_file="u.data", items_file="movies")
    data = read_table(tmp_path, columns)
    assert {u: [data.original_items[i] for i in s] for u, s in data.sequences.items()} == {
        0: ["10", "20", "30"], 1: ["20", "30", "10"]}
    with pytest.raises(DataPrepError, match=r"no interactions table \(interactions.csv or interactions.parquet\) "
                                            r"in .*set data.interactions-file \(CLI --interactions-file\)"):
        read_table(tmp_path, TableColumns(user="uid", item="movie", timestamp="when", title="name", sep="tab"))
    from data_prep.__main__ import parser

    flags = parser().parse_args(["--interactions-file", "u.data", "--items-file", "movies"])
    assert (flags.interactions_file, flags.items_file) == ("u.data", "movies")


def test_a_missing_folder_names_the_path_it_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataPrepError, match=rf"data.path='mydata' is not a folder \(tried {tmp_path}/mydata, "
                                            rf"relative to the working folder {tmp_path}\)"):
        read_table("mydata")
