"""Pure parsing logic of the haproxy_runtime module, on replies captured from HAProxy 3.0 and 2.6."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from modules import execution_module

hr = execution_module("haproxy_runtime")

PROC_30_AFTER_RELOAD = """\
#<PID>          <type>          <reloads>       <uptime>        <version>
7               master          4 [failed: 0]   0d00h14m07s     3.0.11-1+deb13u4
# workers
23              worker          0               0d00h00m00s     3.0.11-1+deb13u4
# old workers
19              worker          1               0d00h00m49s     3.0.11-1+deb13u4
# programs

"""

PROC_30_AFTER_FAILED_RELOAD = """\
#<PID>          <type>          <reloads>       <uptime>        <version>
7               master          2 [failed: 1]   0d00h10m17s     3.0.11-1+deb13u4
# workers
13              worker          1               0d00h00m05s     3.0.11-1+deb13u4
# programs

"""

PROC_26 = """\
#<PID>          <type>          <reloads>       <uptime>        <version>
3599            master          1 [failed: 0]   0d00h00m03s     2.6.12-1+deb12u4
# workers
3729            worker          0               0d00h00m01s     2.6.12-1+deb12u4
# programs

"""

# Older releases (2.0-2.4) had a relative PID column and listed old workers under "# workers".
PROC_OLD_FORMAT = """\
#<PID>          <type>          <relative PID>  <reloads>       <uptime>        <version>
100             master          0               2               0d00h01m00s     2.2.9
# workers
130             worker          1               0               0d00h00m10s     2.2.9
120             worker          1               1               0d00h00m40s     2.2.9
# programs

"""

RELOAD_OK = """\
Success=1
--
[NOTICE]   (7) : New worker (13) forked
[NOTICE]   (7) : Loading success.

"""

RELOAD_FAILED = """\
Success=0
--
[NOTICE]   (7) : haproxy version is 3.0.11-1+deb13u4
[ALERT]    (7) : config : parsing [/etc/haproxy/haproxy.cfg:17] : unknown keyword 'bogus_directive' in 'backend' section
[WARNING]  (7) : Loading failure!

"""

STAT = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,\
bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,\
check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,\
req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,\
rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,\
agent_rise,agent_fall,agent_health,addr,cookie,mode,algo
fe,FRONTEND,,,0,0,9973,0,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,0,0,0,,,,,,,,,,,0,0,0,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,tcp,
be,s1,0,0,3,3,,3,0,0,,0,,0,0,0,0,DRAIN,1,1,0,0,0,5,0,,1,3,1,,3,,2,0,,3,L4OK,,0,,,,,,,,,,,0,0,,,,,1,,,0,0,0,0,,,,\
Layer4 check passed,,2,3,4,,,,198.18.1.1:4431,,tcp,
be,s2,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,1,1,611,611,,1,3,2,,0,,2,0,,0,L4CON,,0,,,,,,,,,,,0,0,,,,,-1,\
Connection refused,,0,0,0,0,,,,Layer4 connection problem,,2,3,0,,,,198.18.1.1:4432,,tcp,
be,BACKEND,0,0,3,3,998,3,0,0,0,0,,0,0,0,0,UP,0,0,0,,1,611,611,,1,3,0,,3,,1,0,,3,,,,,,,,,,,,,,0,0,0,0,0,0,1,,,0,0,0,0,\
,,,,,,,,,,,,,tcp,leastconn
"""


def test_show_proc_30_current_and_old_workers():
    procs = hr._parse_proc(PROC_30_AFTER_RELOAD)
    assert procs["master"] == {
        "pid": 7,
        "type": "master",
        "reloads": 4,
        "failed": 0,
        "uptime": "0d00h14m07s",
        "version": "3.0.11-1+deb13u4",
    }
    assert [(w["pid"], w["current"], w["reloads"]) for w in procs["workers"]] == [(23, True, 0), (19, False, 1)]


def test_show_proc_after_a_failed_reload_keeps_the_worker_current():
    procs = hr._parse_proc(PROC_30_AFTER_FAILED_RELOAD)
    assert procs["master"]["failed"] == 1
    assert [(w["pid"], w["current"]) for w in procs["workers"]] == [(13, True)]


def test_show_proc_26():
    procs = hr._parse_proc(PROC_26)
    assert procs["master"]["reloads"] == 1
    assert procs["master"]["version"].startswith("2.6")
    assert [(w["pid"], w["current"]) for w in procs["workers"]] == [(3729, True)]


def test_show_proc_old_format_picks_the_newest_worker():
    procs = hr._parse_proc(PROC_OLD_FORMAT)
    assert procs["master"]["reloads"] == 2
    assert procs["master"]["failed"] is None
    assert [(w["pid"], w["current"]) for w in procs["workers"]] == [(130, True), (120, False)]


def test_show_proc_without_master_is_an_error():
    with pytest.raises(ValueError):
        hr._parse_proc("Unknown command\n")


@pytest.mark.parametrize(
    ("text", "success", "needle"),
    [
        (RELOAD_OK, True, "Loading success."),
        (RELOAD_FAILED, False, "unknown keyword 'bogus_directive'"),
        ("", None, ""),
        ("\n", None, ""),
    ],
)
def test_reload_answer(text, success, needle):
    parsed_success, messages = hr._parse_reload(text)
    assert parsed_success is success
    assert needle in messages
    assert "Success=" not in messages and not messages.startswith("--")


def test_show_stat_rows_and_server_entries():
    rows = hr._parse_stat(STAT)
    assert [(r["pxname"], r["svname"]) for r in rows] == [
        ("fe", "FRONTEND"),
        ("be", "s1"),
        ("be", "s2"),
        ("be", "BACKEND"),
    ]
    s1, s2 = hr._server_row(rows[1]), hr._server_row(rows[2])
    assert (s1["status"], s1["scur"], s1["check_status"], s1["addr"]) == ("DRAIN", 3, "L4OK", "198.18.1.1:4431")
    assert (s2["status"], s2["scur"], s2["check_status"], s2["last_check"]) == (
        "DOWN",
        0,
        "L4CON",
        "Connection refused",
    )
    assert hr._parse_stat("Unknown command\n") == []


def test_show_info():
    info = hr._parse_info("Name: HAProxy\nVersion: 3.0.11-1+deb13u4\nPid: 9\nUptime: 0d 0h10m11s\n")
    assert info == {"Name": "HAProxy", "Version": "3.0.11-1+deb13u4", "Pid": "9", "Uptime": "0d 0h10m11s"}


@pytest.mark.parametrize(
    ("status", "wanted", "matches"),
    [
        ("UP", "UP", True),
        ("UP 1/2", "up", True),
        ("DOWN 1/2", "UP", False),
        ("MAINT (via be/x)", "MAINT", True),
        ("DRAIN", "UP", False),
        ("no check", "no check", True),
    ],
)
def test_status_matches(status, wanted, matches):
    assert hr._status_matches(status, wanted) is matches


def test_errors_name_socket_and_command(tmp_path):
    missing = str(tmp_path / "none.sock")
    with pytest.raises(hr.CommandExecutionError, match=rf"{missing}: 'show info' failed"):
        hr._send(missing, "show info")
    with pytest.raises(
        hr.CommandExecutionError, match=r"/x.sock: 'set server a/b state drain' refused: No such server"
    ):
        hr._check("No such server.\n", "/x.sock", "set server a/b state drain")
    with pytest.raises(hr.CommandExecutionError, match="refused: \\(empty reply\\)"):
        hr._check("", "/x.sock", "show stat", expect="# pxname")


def test_send_reads_one_reply_after_shutting_down_writes(tmp_path):
    # Like the master CLI: the answer comes only once our side is shut for writing.
    path = str(tmp_path / "cli.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        data = b""
        while chunk := conn.recv(100):
            data += chunk
        conn.sendall(b"got " + data)
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        assert hr._send(path, "show proc", timeout=5) == "got show proc\n"
    finally:
        thread.join(timeout=5)
        server.close()
        os.unlink(path)


def test_default_sockets_without_salt(monkeypatch, tmp_path):
    assert hr._sockets(None, None) == (hr.DEFAULT_ADMIN_SOCKET, hr.DEFAULT_MASTER_SOCKET)
    # Only a master socket there: worker commands go through it.
    master = tmp_path / "master.sock"
    master.touch()
    monkeypatch.setattr(hr, "DEFAULT_MASTER_SOCKET", str(master))
    monkeypatch.setattr(hr, "DEFAULT_ADMIN_SOCKET", str(tmp_path / "absent.sock"))
    assert hr._sockets(None, None) == (None, str(master))
    assert hr._sockets("/a.sock", None) == ("/a.sock", None)
