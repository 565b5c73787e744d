"""The admin listener: metrics, health and the dashboard, for operators only."""
