"""Distributed M-step and path index on a real local SparkSession vs the sequential reference."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dr_model.config import DRConfig, replace
from dr_model.mstep import initial_assignment, mstep_reference, objective, path_sizes
from dr_model.scores import PathScores
from dr_model.trainer import pair_scores
from jobs.benchmarks.mstep import synthetic_scores
from jobs.mstep import MStepOptions, distributed_mstep, plan_partitions
from jobs.path_index import build_path_index, find_path_index
from jobs.tables import CommitMeta, Warehouse
from test_spark_scores import CFG as ML_CFG
from test_spark_scores import trained_ml100k

# fixed alpha, no exploration: the paper's M-step, comparable with the sequential reference
SYN_CFG = DRConfig.from_dict({
    "model": {"K": 20, "D": 3, "J": 3},
    "search": {"score_paths": 16},
    "mstep": {"alpha": 2e-7, "rounds": 4, "block_size": 256, "explore": 0},
})


def write_inputs(wh: Warehouse, ps: PathScores, assign0: np.ndarray) -> tuple[int, int]:
    """path_scores and a starting item_paths version from arrays; returns their versions."""
    item, path, score, n_v = ps.to_long()
    v_ps = wh.write_arrow("path_scores", pd.DataFrame({"item_id": item, "path": path, "score": score, "n_v": n_v}),
                          CommitMeta("test", "ps")).version
    V, J = assign0.shape
    ip = pd.DataFrame({"item_id": np.repeat(ps.items, J), "slot": np.tile(np.arange(J, dtype=np.int32), V),
                       "path": assign0.ravel(), "score": np.nan})
    return v_ps, wh.write_arrow("item_paths", ip, CommitMeta("test", "init")).version


def read_assign(wh: Warehouse, version: int, items: np.ndarray, J: int) -> np.ndarray:
    t = wh.read_arrow("item_paths", version).to_pandas().sort_values(["item_id", "slot"])
    np.testing.assert_array_equal(t["item_id"].to_numpy()[::J], items)
    return t["path"].to_numpy().reshape(-1, J)


def check_against_reference(spark, wh: Warehouse, ps: PathScores, cfg: DRConfig, partitions: int) -> list:
    P, J = cfg.model.num_paths, cfg.model.J
    assign0 = initial_assignment(len(ps), J, P, seed=3)
    v_ps, v_init = write_inputs(wh, ps, assign0)
    ref = mstep_reference(ps, assign0, P, cfg.mstep)
    res, stats = distributed_mstep(spark, wh, cfg, v_ps, v_init, "run-m", 2, MStepOptions(partitions=partitions))
    print("reference  :", [(round(r.objective, 1), r.max_path_size, r.items_moved) for r in [ref.initial, *ref.rounds]])
    print("distributed:", [(round(r.objective, 1), r.max_path_size, r.items_moved) for r in stats])
    # the committed table is the assignment the statistics describe
    got = read_assign(wh, res.version, ps.items, J)
    # each row's score is s[v, path] of its item's list, null where the path is not a candidate
    score = wh.read_arrow("item_paths", res.version).to_pandas().sort_values(["item_id", "slot"])["score"]
    hit = ps.paths[:, None, :] == got[:, :, None]
    want = np.where(hit.any(2), np.where(hit, ps.scores[:, None, :], 0.0).sum(2), np.nan)
    np.testing.assert_array_equal(score.to_numpy().reshape(-1, J), want)
    obj = objective(ps, got, P, cfg.mstep.alpha, cfg.mstep.penalty_power)
    assert obj.total == pytest.approx(stats[-1].objective, rel=1e-9)
    assert path_sizes(got, P).max() == stats[-1].max_path_size
    assert (np.sort(got, 1)[:, 1:] != np.sort(got, 1)[:, :-1]).all()         # J distinct paths per item
    assert stats[0].objective == pytest.approx(ref.initial.objective, rel=1e-9)
    assert [s.round for s in stats] == list(range(cfg.mstep.rounds + 1))
    # the acceptance criteria of the issue; a distributed objective ABOVE the reference's is not a
    # miss (on the small ML-100K problem the sequential greedy order ends in a worse local optimum)
    assert stats[-1].objective >= ref.objective - 0.01 * abs(ref.objective)
    assert abs(stats[-1].max_path_size - ref.rounds[-1].max_path_size) <= 0.10 * ref.rounds[-1].max_path_size
    assert stats[-1].items_moved < stats[1].items_moved                        # settling down
    info = wh.versions("item_paths")[-1]
    assert (info.job, info.run_id, info.round) == ("mstep", "run-m", 2)
    assert info.metadata["dr.path_scores_version"] == v_ps
    return stats


def test_distributed_mstep_matches_reference_on_synthetic_scores(spark, warehouse):
    ps = synthetic_scores(20_000, 16, SYN_CFG.model.num_paths, seed=0, pool=32)
    check_against_reference(spark, warehouse, ps, SYN_CFG, partitions=2)


def test_distributed_mstep_matches_reference_on_movielens_scores(spark, warehouse):
    res, hist, target, _ = trained_ml100k()
    ps = pair_scores(res.model, res.vocab.seq(hist), target, ML_CFG.search.score_paths, ML_CFG.search.batch_size)
    # The criterion is against the paper's sequential algorithm: compare both without the
    # improving-only acceptance test (the synthetic case above covers the default with it).
    paper = replace(ML_CFG, mstep=replace(ML_CFG.mstep, improving_only=False, explore=0))
    check_against_reference(spark, warehouse, ps, paper, partitions=2)


def test_auto_alpha_and_exploration_barrier_equals_jobs_and_follows_in_process(spark, warehouse):
    """The default M-step (alpha searched for the budget's path size, exploration paths): the barrier
    stage and one job per trial/round give the same run; the in-process M-step lands close to it."""
    from dr_model.calibrate import with_exploration
    from dr_model.mstep import effective_block, mstep_blocked

    cfg = replace(SYN_CFG, mstep=replace(SYN_CFG.mstep, alpha="auto", explore=2, rounds=3),
                  search=replace(SYN_CFG.search, items_per_user=60, beam=10))      # target path size 6
    P, J = cfg.model.num_paths, cfg.model.J
    ps = synthetic_scores(6000, 16, P, seed=4, pool=32)
    assign0 = initial_assignment(len(ps), J, P, seed=7)
    v_ps, v_init = write_inputs(warehouse, ps, assign0)
    pair = {}
    for sync in ("barrier", "jobs"):
        logs: list[str] = []
        res, stats = distributed_mstep(spark, warehouse, cfg, v_ps, v_init, f"run-auto-{sync}", 0,
                                       MStepOptions(partitions=2, sync=sync), log=logs.append)
        assert any("after" in m and "trials" in m for m in logs), logs
        md = warehouse.versions("item_paths")[-1].metadata
        assert md["dr.alpha"] == stats[-1].alpha and md["dr.path_size"] == stats[-1].path_size
        pair[sync] = (read_assign(warehouse, res.version, ps.items, J), [(s.alpha, s.max_path_size) for s in stats])
    np.testing.assert_array_equal(pair["barrier"][0], pair["jobs"][0])
    assert pair["barrier"][1] == pair["jobs"][1]
    # the same search in one process (its table moves in blocks, the distributed one extrapolates)
    target = cfg.search.target_path_size(len(ps), cfg.eval.k)
    ms = replace(cfg.mstep, block_size=effective_block(cfg.mstep.block_size, len(ps), 2))
    local = mstep_blocked(with_exploration(ps, cfg.model.K, cfg.model.D, 2, cfg.mstep.explore_score), assign0, P, ms,
                          target_size=target)
    alpha = stats[-1].alpha
    assert alpha / 10 <= local.alpha <= alpha * 10
    assert stats[-1].path_size == pytest.approx(local.rounds[-1].path_size, rel=0.25)
    assert stats[-1].path_size <= 1.3 * target                                # the search held the size


def test_random_start_path_index_and_failed_run(spark, warehouse):
    cfg = replace(SYN_CFG, mstep=replace(SYN_CFG.mstep, rounds=2))
    ps = synthetic_scores(3000, 16, cfg.model.num_paths, seed=1, pool=32)
    item, path, score, n_v = ps.to_long()
    v_ps = warehouse.write_arrow("path_scores", pd.DataFrame({"item_id": item * 7, "path": path, "score": score,
                                                              "n_v": n_v}), CommitMeta("test", "ps")).version
    res, stats = distributed_mstep(spark, warehouse, cfg, v_ps, None, "run-r", 0)
    assert stats[0].max_path_size <= 2 * -(-3 * 3000 // cfg.model.num_paths) + 2      # balanced random start
    assign = read_assign(warehouse, res.version, ps.items * 7, 3)
    # path index of that version: every (item, slot, path) once, findable by the item_paths version
    idx = build_path_index(spark, warehouse, res.version, "run-r")
    t = warehouse.read_arrow("path_index", idx.version).to_pandas()
    assert len(t) == assign.size
    want = set(zip(np.repeat(ps.items * 7, 3).tolist(), assign.ravel().tolist()))
    assert set(zip(t["item_id"].tolist(), t["path"].tolist())) == want
    assert find_path_index(warehouse, res.version) == idx.version
    # a starting version with the wrong number of paths per item fails in the executors: nothing committed
    bad = warehouse.write_arrow("item_paths", pd.DataFrame({"item_id": [7], "slot": np.int32([0]), "path": [1],
                                                            "score": [np.nan]}), CommitMeta("test", "bad"))
    with pytest.raises(Exception, match="expected J=3"):
        distributed_mstep(spark, warehouse, cfg, v_ps, bad.version, "run-bad", 1)
    assert warehouse.version("item_paths") == bad.version


def test_worker_cache_fallback_tree_merge_and_barrier_give_the_same_run(spark, warehouse):
    """Only speed changes: cache hits, rebuilds from path_scores, the tree merge; barrier stage = a job per round."""
    import re

    cfg = replace(SYN_CFG, mstep=replace(SYN_CFG.mstep, rounds=2))
    P, J = cfg.model.num_paths, cfg.model.J
    ps = synthetic_scores(4000, 16, P, seed=2, pool=32)
    assign0 = initial_assignment(len(ps), J, P, seed=5)
    assign0 = np.concatenate([assign0, initial_assignment(50, J, P, seed=6)])     # 50 items without scores
    items = np.concatenate([ps.items, 10 ** 6 + np.arange(50)])
    v_ps, _ = write_inputs(warehouse, ps, assign0[:len(ps)])
    ip = pd.DataFrame({"item_id": np.repeat(items, J), "slot": np.tile(np.arange(J, dtype=np.int32), len(items)),
                       "path": assign0.ravel(), "score": np.nan})
    v_init = warehouse.write_arrow("item_paths", ip, CommitMeta("test", "init2"), mode="overwrite").version
    runs = {}
    for name, opts in {"cache": MStepOptions(partitions=3),
                       "rebuild": MStepOptions(partitions=3, worker_cache=False),
                       "tree": MStepOptions(partitions=3, driver_merge=1)}.items():
        logs: list[str] = []
        res, stats = distributed_mstep(spark, warehouse, cfg, v_ps, v_init, f"run-{name}", 0, opts, log=logs.append)
        hits = [tuple(int(x) for x in m.groups()) for m in
                (re.search(r"(\d+) in worker memory, (\d+) mapped from local files, (\d+) rebuilt", s) for s in logs) if m]
        assert len(hits) == cfg.mstep.rounds
        if name == "rebuild":
            assert all(h == (0, 0, 3) for h in hits)
        else:
            assert all(h[2] == 0 and h[0] + h[1] == 3 for h in hits)          # local mode: the cache always hits
        runs[name] = (read_assign(warehouse, res.version, items, J),
                      [(s.objective, s.max_path_size, s.nonempty_paths, s.items_moved, s.skipped_items) for s in stats],
                      warehouse.read_arrow("item_paths", res.version).to_pandas().sort_values(["item_id", "slot"]))
    for name in ("rebuild", "tree"):
        np.testing.assert_array_equal(runs[name][0], runs["cache"][0])
        assert runs[name][1] == runs["cache"][1]
        pd.testing.assert_frame_equal(runs[name][2].reset_index(drop=True), runs["cache"][2].reset_index(drop=True))
    # all rounds in one barrier stage (2 partitions fit local[2]'s 2 task slots) = one job per round, exactly;
    # the one-stage M-step (build, rounds, item_paths files in the barrier stage) = the three-stage one
    pair = {}
    for name, sync, one in (("barrier", "barrier", True), ("barrier-3", "barrier", False), ("jobs", "jobs", True)):
        logs = []
        res, stats = distributed_mstep(spark, warehouse, cfg, v_ps, v_init, f"run-{name}", 0,
                                       MStepOptions(partitions=2, sync=sync, one_stage=one), log=logs.append)
        assert warehouse.versions("item_paths")[-1].metadata["dr.sync"] == sync
        assert any(f"rounds {'in one barrier stage' if sync == 'barrier' else 'one job each'}" in m for m in logs)
        assert any("in the stage's tasks" in m for m in logs) == (name == "barrier")
        pair[name] = (read_assign(warehouse, res.version, items, J),
                      [(s.max_path_size, s.nonempty_paths, s.items_moved, s.skipped_items) for s in stats],
                      [s.objective for s in stats],
                      warehouse.read_arrow("item_paths", res.version).to_pandas().sort_values(["item_id", "slot"]))
    for name in ("barrier-3", "jobs"):
        np.testing.assert_array_equal(pair["barrier"][0], pair[name][0])
        assert pair["barrier"][1] == pair[name][1]
        assert pair["barrier"][2] == pytest.approx(pair[name][2], rel=1e-12)
        pd.testing.assert_frame_equal(pair["barrier"][3].reset_index(drop=True), pair[name][3].reset_index(drop=True))
    with pytest.raises(ValueError, match="concurrent task slots"):
        distributed_mstep(spark, warehouse, cfg, v_ps, v_init, "run-too-wide", 0, MStepOptions(partitions=3,
                                                                                              sync="barrier"))
    # carried-through items keep their paths and get no score
    got, _, tbl = runs["cache"]
    np.testing.assert_array_equal(got[len(ps):], assign0[len(ps):])
    assert tbl[tbl["item_id"] >= 10 ** 6]["score"].isna().all()


def test_small_catalogs_plan_one_partition_per_min_items(spark):
    # extrapolated size tables are noisy on paths of a few items: small catalogs sweep in one partition
    slots, _ = plan_partitions(spark, MStepOptions())
    assert plan_partitions(spark, MStepOptions(), items=1_359) == (1, True)
    assert plan_partitions(spark, MStepOptions(), items=10 ** 8)[0] == slots
    assert plan_partitions(spark, MStepOptions(min_items_per_partition=1_000), items=2_500)[0] == min(2, slots)
    assert plan_partitions(spark, MStepOptions(partitions=3, sync="jobs"), items=10) == (3, False)


def test_bucketed_path_scores_are_read_by_the_tasks_and_give_the_shuffled_run(spark, warehouse):
    """path_scores written as the scores job writes it (a file set per hash bucket of item_id): the
    M-step tasks read their buckets' files instead of shuffling the table, with the same result."""
    cfg = replace(SYN_CFG, mstep=replace(SYN_CFG.mstep, rounds=2))
    P, J = cfg.model.num_paths, cfg.model.J
    ps = synthetic_scores(4000, 16, P, seed=4, pool=32)
    assign0 = initial_assignment(len(ps) + 50, J, P, seed=7)
    items = np.concatenate([ps.items, 10 ** 6 + np.arange(50)])                     # 50 items without scores
    v_plain, _ = write_inputs(warehouse, ps, assign0[:len(ps)])
    ip = pd.DataFrame({"item_id": np.repeat(items, J), "slot": np.tile(np.arange(J, dtype=np.int32), len(items)),
                       "path": assign0.ravel(), "score": np.nan})
    v_init = warehouse.write_arrow("item_paths", ip, CommitMeta("test", "init3"), mode="overwrite").version
    rows = warehouse.read_spark(spark, "path_scores", v_plain)
    v_buck = warehouse.write_spark("path_scores", rows.repartition(4, "item_id"),
                                   CommitMeta("test", "ps-buckets", extra={"item_buckets": 4}), mode="overwrite").version
    runs = {}
    for name, v, opts in (("shuffled", v_plain, MStepOptions(partitions=2)),
                          ("buckets", v_buck, MStepOptions(partitions=2)),
                          ("buckets-rebuild", v_buck, MStepOptions(partitions=2, worker_cache=False)),
                          ("random-start", v_buck, MStepOptions(partitions=2))):
        logs: list[str] = []
        init = None if name == "random-start" else v_init
        res, stats = distributed_mstep(spark, warehouse, cfg, v, init, f"run-{name}", 0, opts, log=logs.append)
        built = next(m for m in logs if "built from path_scores" in m)
        assert ("item buckets' files" in built) == name.startswith("buckets") or name == "random-start"
        runs[name] = (warehouse.read_arrow("item_paths", res.version).to_pandas()
                      .sort_values(["item_id", "slot"]).reset_index(drop=True),
                      [(s.objective, s.max_path_size, s.items_moved, s.skipped_items) for s in stats])
    for name in ("buckets", "buckets-rebuild"):
        pd.testing.assert_frame_equal(runs[name][0], runs["shuffled"][0])
        assert runs[name][1] == runs["shuffled"][1]
    assert len(runs["random-start"][0]) == len(ps) * J                              # scored items only
    # a version whose files do not match its recorded buckets is refused by the tasks, nothing committed
    v_bad = warehouse.write_spark("path_scores", rows.repartition(4, "path"),
                                  CommitMeta("test", "ps-bad", extra={"item_buckets": 4}), mode="overwrite").version
    before = warehouse.version("item_paths")
    with pytest.raises(Exception, match="other partitions|hold items"):
        distributed_mstep(spark, warehouse, cfg, v_bad, None, "run-bad-buckets", 0, MStepOptions(partitions=2))
    assert warehouse.version("item_paths") == before


def test_spark_hash_partitioner_in_numpy_matches_spark(spark):
    import pyarrow as pa
    from pyspark.sql import functions as F

    from spark_udfs.partitioning import spark_hash, spark_partition, task_of

    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(-2 ** 63, 2 ** 63 - 1, 300, dtype=np.int64), np.arange(-20, 200)])
    df = spark.createDataFrame(pd.DataFrame({"item_id": ids}))
    got = df.select("item_id", F.hash("item_id").alias("h")).toPandas()
    np.testing.assert_array_equal(spark_hash(got["item_id"].to_numpy()), got["h"].to_numpy().astype(np.int32))

    def tag(it):
        from pyspark import TaskContext

        for b in it:
            yield pa.RecordBatch.from_arrays([b.column(0), pa.array(np.full(b.num_rows, TaskContext.get().partitionId()))],
                                             names=["item_id", "p"])
    for n in (1, 3, 8):
        t = df.repartition(n, "item_id").mapInArrow(tag, "item_id long, p long").toPandas()
        np.testing.assert_array_equal(spark_partition(t["item_id"].to_numpy(), n), t["p"].to_numpy())
    assert task_of("x/part-0a1b2c3d-00017-0-0123456789ab.parquet") == 17 and task_of("part-d1234-x.parquet") is None
