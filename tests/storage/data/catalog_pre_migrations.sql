-- A catalog as the release before migrations (ce70117) created it: its schema from
-- Base.metadata.create_all and a few rows through its ORM; `sqlite3 .dump` output.
BEGIN TRANSACTION;
CREATE TABLE instances (
	id INTEGER NOT NULL, 
	series_id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax_uid VARCHAR(64) NOT NULL, 
	instance_number INTEGER, 
	file_path VARCHAR(255) NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	calling_ae VARCHAR(16), 
	received_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(series_id) REFERENCES series (id)
);
INSERT INTO "instances" VALUES(1,1,'1.2.826.0.1.3680043.8.498.3.0','1.2.840.10008.5.1.4.1.1.2','1.2.840.10008.1.2.1',1,'ab/cd/00000000000000000000000000000000000000000000000000000000000000.dcm','0000000000000000000000000000000000000000000000000000000000000000',1000,'SCANNER','2026-11-30 12:00:00.000000');
INSERT INTO "instances" VALUES(2,1,'1.2.826.0.1.3680043.8.498.3.1','1.2.840.10008.5.1.4.1.1.2','1.2.840.10008.1.2.1',2,'ab/cd/00000000000000000000000000000000000000000000000000000000000001.dcm','0000000000000000000000000000000000000000000000000000000000000001',1000,'SCANNER','2026-11-30 12:00:00.000000');
CREATE TABLE job_events (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	state VARCHAR(13) NOT NULL, 
	reason TEXT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
INSERT INTO "job_events" VALUES(1,1,'2026-11-30 12:00:00.000000','DONE','done');
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	state VARCHAR(13) NOT NULL, 
	reason TEXT, 
	series_instance_uid VARCHAR(64), 
	selection_note TEXT, 
	attempts INTEGER NOT NULL, 
	worker VARCHAR(64), 
	heartbeat_at DATETIME, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	result_json TEXT, 
	PRIMARY KEY (id), 
	UNIQUE (study_id, version), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "jobs" VALUES(1,1,1,'DONE',NULL,NULL,NULL,1,NULL,NULL,'2026-11-30 12:00:00.000000','2026-11-30 12:00:00.000000','{"not_processed": "test", "findings": []}');
CREATE TABLE outbox (
	id INTEGER NOT NULL, 
	output_id INTEGER NOT NULL, 
	destination VARCHAR(128) NOT NULL, 
	state VARCHAR(7) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	last_status VARCHAR(32), 
	last_error TEXT, 
	sent_at DATETIME, 
	wait_seconds FLOAT, 
	PRIMARY KEY (id), 
	UNIQUE (output_id, destination), 
	FOREIGN KEY(output_id) REFERENCES outputs (id)
);
INSERT INTO "outbox" VALUES(1,1,'PACS@10.0.0.5:104','SENT',1,'2026-11-30 12:00:00.000000','0x0000',NULL,'2026-11-30 12:00:00.000000',NULL);
INSERT INTO "outbox" VALUES(2,2,'PACS@10.0.0.5:104','PENDING',4,'2026-11-30 12:00:00.000000','no association',NULL,NULL,NULL);
INSERT INTO "outbox" VALUES(3,2,'ARCHIVE@10.0.0.6:11112','DEAD',1,'2026-11-30 12:00:00.000000','0xA900',NULL,NULL,NULL);
CREATE TABLE outputs (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	file_path VARCHAR(255) NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id), 
	UNIQUE (sop_instance_uid)
);
INSERT INTO "outputs" VALUES(1,1,'seg','1.2.840.10008.5.1.4.1.1.66.4','1.2.826.0.1.3680043.8.498.9.False','1.2.826.0.1.3680043.8.498.8','out/seg.dcm','ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff');
INSERT INTO "outputs" VALUES(2,1,'sr','1.2.840.10008.5.1.4.1.1.66.4','1.2.826.0.1.3680043.8.498.9.True','1.2.826.0.1.3680043.8.498.8','out/sr.dcm','ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff');
CREATE TABLE quarantine (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	file_path VARCHAR(255) NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	reason TEXT NOT NULL, 
	calling_ae VARCHAR(16), 
	received_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
CREATE TABLE refusals (
	id INTEGER NOT NULL, 
	refused_at DATETIME NOT NULL, 
	calling_ae VARCHAR(16), 
	sop_instance_uid VARCHAR(64), 
	status INTEGER NOT NULL, 
	reason TEXT NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "refusals" VALUES(1,'2026-11-30 12:00:00.000000','X',NULL,43264,'not CT');
CREATE TABLE series (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16), 
	series_number INTEGER, 
	series_description VARCHAR(64), 
	lossy BOOLEAN NOT NULL, 
	instance_count INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "series" VALUES(1,1,'1.2.826.0.1.3680043.8.498.2','CT',1,NULL,0,2);
CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	state VARCHAR(9) NOT NULL, 
	study_date VARCHAR(8), 
	study_description VARCHAR(64), 
	received_count INTEGER NOT NULL, 
	instance_count INTEGER NOT NULL, 
	flagged BOOLEAN NOT NULL, 
	flag_reason TEXT, 
	created_at DATETIME NOT NULL, 
	last_received_at DATETIME NOT NULL, 
	completed_at DATETIME, 
	completion_count INTEGER NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "studies" VALUES(1,'1.2.826.0.1.3680043.8.498.1','COMPLETE','20261130',NULL,2,2,0,NULL,'2026-11-30 12:00:00.000000','2026-11-30 12:00:00.000000',NULL,1);
CREATE TABLE study_events (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	detail TEXT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "study_events" VALUES(1,1,'2026-11-30 12:00:00.000000','complete','stable');
CREATE UNIQUE INDEX ix_studies_study_instance_uid ON studies (study_instance_uid);
CREATE INDEX ix_studies_state ON studies (state);
CREATE INDEX ix_refusals_refused_at ON refusals (refused_at);
CREATE INDEX ix_series_study_id ON series (study_id);
CREATE UNIQUE INDEX ix_series_series_instance_uid ON series (series_instance_uid);
CREATE INDEX ix_quarantine_study_id ON quarantine (study_id);
CREATE INDEX ix_quarantine_sop_instance_uid ON quarantine (sop_instance_uid);
CREATE INDEX ix_study_events_study_id ON study_events (study_id);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_jobs_study_id ON jobs (study_id);
CREATE INDEX ix_instances_series_id ON instances (series_id);
CREATE UNIQUE INDEX ix_instances_sop_instance_uid ON instances (sop_instance_uid);
CREATE INDEX ix_job_events_job_id ON job_events (job_id);
CREATE INDEX ix_outputs_job_id ON outputs (job_id);
CREATE INDEX ix_outbox_output_id ON outbox (output_id);
CREATE INDEX ix_outbox_state ON outbox (state);
COMMIT;