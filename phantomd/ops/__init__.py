"""Operations: metrics, logs, health and readiness, systemd, workers, the
demo."""
