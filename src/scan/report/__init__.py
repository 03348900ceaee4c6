"""The HTML report of a run (write): a trust card, a map, one card per cluster with prototypes,
charts, and pages of members for large runs; every file self-contained and escaped."""
from scan.report.write import ReportData, render_report, report_data, write_files, write_report, write_run_report

__all__ = ["ReportData", "render_report", "report_data", "write_files", "write_report", "write_run_report"]
