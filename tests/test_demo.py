"""The demo's table: every row, selection columns only where a selection was used."""
from vitkd.demo import table


def test_table_shows_selection_bounds():
    rows = [
        {"run": "teacher", "data": "original (labels)", "params": 675562, "test_acc_mean": 0.98333, "test_acc_std": 0.0},
        {"run": "attention_probe", "data": "wild", "params": 77000, "test_acc_mean": 0.9574, "test_acc_std": 0.0212,
         "precision": 0.4611, "precision_max": 2 / 3, "value_auroc": 0.6371},
    ]
    head, rule, teacher, ap = table(rows).splitlines()
    assert head.split()[-4:] == ["precision", "(max)", "V", "AUROC"] and set(rule) == {"-"}
    assert teacher.split()[-3:] == ["-", "-", "-"] and "98.33 ± 0.00" in teacher
    assert ap.split()[-3:] == ["0.461", "0.667", "0.637"] and "95.74 ± 2.12" in ap
