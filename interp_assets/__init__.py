"""SAE features over text datasets: pure logic modules plus the Dagster asset wiring."""
