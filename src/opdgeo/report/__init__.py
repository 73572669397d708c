"""Reports: trajectory figures (`figures`), the study report (`study_report`), its tables
(`tables`) and its other figures (`plots`)."""
