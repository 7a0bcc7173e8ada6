import optuna
import pytest

from reports.study import find_studies, load_studies, study_section

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _single_objective_study() -> optuna.Study:
    study = optuna.create_study(study_name="rlw", direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.ThresholdPruner(upper=5.0))

    def objective(trial: optuna.Trial) -> float:
        w = trial.suggest_float("rl.weight", 1e-4, 1.0, log=True)
        v = 0.0
        for step in range(1, 5):
            v = (w - 0.01) ** 2 * 100 + 1.0 / step + (10.0 if w > 0.5 else 0.0)
            trial.report(v, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return v

    study.enqueue_trial({"rl.weight": 0.9})  # pruned by the threshold
    study.optimize(objective, n_trials=8)
    return study


def test_single_objective_section():
    study = _single_objective_study()
    sec = study_section(study)
    slugs = [f.slug for f in sec.figures]
    assert slugs == ["study_rlw_history", "study_rlw_slice0", "study_rlw_intermediate"]
    assert len(sec.table) == 8
    assert set(sec.table["state"]) == {"COMPLETE", "PRUNED"}
    assert (sec.table.loc[sec.table["state"] == "PRUNED", "last_step"] == 1).all()
    best = study.best_trial
    assert f"Best trial #{best.number}: value = {best.value:.4g}" in sec.summary
    assert "8 trials (7 complete, 1 pruned)" in sec.summary


def test_two_objective_section_has_a_pareto_front():
    study = optuna.create_study(study_name="pareto", directions=["minimize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(lambda t: ((x := t.suggest_float("x", 0, 1)) ** 2, x), n_trials=10)
    sec = study_section(study)
    pareto = next(f for f in sec.figures if f.slug == "study_pareto_pareto")
    # for (x^2 min, x max) every trial is non-dominated
    assert pareto.meta["front"] == sorted(t.number for t in study.trials)
    assert {"value0", "value1", "param:x"} <= set(sec.table.columns)


def test_find_studies_opens_journal_files(tmp_path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "study.journal")))
    s = optuna.create_study(study_name="j", storage=storage)
    s.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=3)
    found = find_studies(tmp_path)
    assert [x.study_name for x in found] == ["j"]
    assert len(found[0].trials) == 3
    assert find_studies(tmp_path / "empty") == []


def test_load_studies_by_path_or_url(tmp_path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = tmp_path / "s.journal"
    storage = JournalStorage(JournalFileBackend(str(path)))
    for name in ("a", "b"):
        optuna.create_study(study_name=name, storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1),
                                                                       n_trials=2)
    assert [s.study_name for s in load_studies(str(path))] == ["a", "b"]
    assert [s.study_name for s in load_studies(str(path), name="b")] == ["b"]
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    optuna.create_study(study_name="rdb", storage=url)
    assert [s.study_name for s in load_studies(url)] == ["rdb"]
    with pytest.raises(ValueError, match="study 'zzz' is not in"):
        load_studies(str(path), name="zzz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_studies(str(tmp_path / "missing.journal"))


def test_pareto_front_names_the_weights_and_shows_the_recorded_gold_reward():
    # the search's shape: FD down, proxy reward up, the gold reward recorded beside them; large weights diverge
    study = optuna.create_study(study_name="trade", directions=["minimize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=3))
    study.set_metric_names(["val/fd_nfe2", "val/proxy_nfe2"])
    gold = {}
    for _ in range(12):
        t = study.ask()
        w = t.suggest_float("rl.weight", 0.1, 300.0, log=True)
        if w > 100:
            t.set_user_attr("diverged", True)
            t.set_user_attr("prune_reason", "seed 0: pre-clip grad norm 1e15 > 1000 at step 300")
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
            continue
        fd, proxy = 20 + w ** 1.5, 1 - 1 / (1 + w)
        gold[t.number] = proxy - 0.002 * w ** 2  # the gold reward turns down where the proxy is over-optimised
        t.set_user_attr("recorded", {"val/gold_nfe2": gold[t.number]})
        study.tell(t, [fd, proxy])
    sec = study_section(study)
    pareto = next(f for f in sec.figures if f.slug == "study_trade_pareto")
    front = sorted(t.number for t in study.best_trials)
    assert pareto.meta["front"] == front and pareto.meta["colour"] == "val/gold_nfe2"
    assert list(sec.front["trial"]) == sorted(front, key=lambda n: study.trials[n].values[0])
    assert sec.front["val/gold_nfe2"].tolist() == [gold[n] for n in sec.front["trial"]]
    assert sec.table.loc[sec.table["trial"] == front[0], "val/gold_nfe2"].item() == gold[front[0]]
    for n in front:  # every weight on the front is named in the summary, with its objective values
        w = study.trials[n].params["rl.weight"]
        assert f"#{n} (rl.weight = {w:.4g}: val/fd_nfe2 = {study.trials[n].values[0]:.4g}" in sec.summary
    diverged = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert diverged, "the seed must produce a diverging weight for this test to mean anything"
    assert f"Pruned as diverging ({len(diverged)}; no values" in sec.summary
    assert all(f"#{t.number} (rl.weight = {t.params['rl.weight']:.4g})" in sec.summary for t in diverged)
